# flowgate: gunicorn serving the gateway. Build: docker build -t flowgate .
# Run: docker run -p 5000:5000 -e FLOWGATE_API_KEYS="backend:<16+ characters>:read+trigger" flowgate
# (without keys it narrows its bind to 127.0.0.1: it starts, and its HEALTHCHECK passes, but nothing outside the
# container reaches it). In production, put a buffering proxy in front (docker-compose.yml: nginx with
# deploy/nginx.conf) rather than publishing gunicorn.
FROM python:3.11-slim AS build
WORKDIR /build
COPY requirements.txt .
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLOWGATE_HOST=0.0.0.0 \
    FLOW_SERVER_PORT=5000 \
    FLOWGATE_VAR_DIR=/app/var
RUN groupadd --gid 10001 flowgate && useradd --uid 10001 --gid flowgate --create-home flowgate
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY app ./app
COPY connectors ./connectors
COPY flows ./flows
COPY workflows ./workflows
COPY data/products.csv ./data/products.csv
COPY wsgi.py gunicorn.conf.py connectors.yaml ./
RUN python -m connectors.demo data/demo_shop.db \
    && mkdir -p var \
    && chown -R flowgate:flowgate var data
USER flowgate
VOLUME ["/app/var"]
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FLOW_SERVER_PORT', '5000'), timeout=2)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
