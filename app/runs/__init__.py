"""The run store and the local executor: run state that every gunicorn process shares."""
