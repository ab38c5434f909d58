-- The run store's schema as create_all made it before migrations (commit 5afc4a9), postgresql.
CREATE TABLE executors (
	id VARCHAR(128) NOT NULL, 
	hostname VARCHAR(255) NOT NULL, 
	pid INTEGER NOT NULL, 
	slots INTEGER NOT NULL, 
	busy INTEGER NOT NULL, 
	started_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	heartbeat_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE run_logs (
	id SERIAL NOT NULL, 
	run_id VARCHAR(32) NOT NULL, 
	at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	level VARCHAR(10) NOT NULL, 
	logger VARCHAR(200) NOT NULL, 
	message TEXT NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_run_logs_run_id ON run_logs (run_id);

CREATE TABLE run_nodes (
	run_id VARCHAR(32) NOT NULL, 
	node_id VARCHAR(100) NOT NULL, 
	position INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	data JSON NOT NULL, 
	updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (run_id, node_id)
);

CREATE TABLE runs (
	id VARCHAR(32) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	target VARCHAR(200) NOT NULL, 
	params JSON NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	backend VARCHAR(16) NOT NULL, 
	fallback_reason TEXT, 
	prefect_flow_run_id VARCHAR(64), 
	prefect_state VARCHAR(32), 
	idempotency_key VARCHAR(255), 
	request_hash VARCHAR(64), 
	concurrency_key VARCHAR(512) NOT NULL, 
	lease_owner VARCHAR(128), 
	lease_expires_at TIMESTAMP WITHOUT TIME ZONE, 
	cancel_requested BOOLEAN NOT NULL, 
	attempts INTEGER NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	started_at TIMESTAMP WITHOUT TIME ZONE, 
	finished_at TIMESTAMP WITHOUT TIME ZONE, 
	result JSON, 
	error JSON, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_runs_created ON runs (created_at, id);

CREATE INDEX ix_runs_queue ON runs (status, backend, created_at);

CREATE INDEX ix_runs_status ON runs (status);

CREATE INDEX ix_runs_target ON runs (target);

CREATE INDEX ix_runs_target_status ON runs (target, kind, status);

CREATE UNIQUE INDEX uq_runs_idempotency ON runs (kind, target, idempotency_key);

CREATE UNIQUE INDEX uq_runs_one_active_per_key ON runs (concurrency_key) WHERE status IN ('running', 'cancelling') AND backend = 'local';

CREATE TABLE run_callbacks (
	run_id VARCHAR(32) NOT NULL, 
	url TEXT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	attempts JSON NOT NULL, 
	next_attempt_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	claimed_by VARCHAR(128), 
	claimed_until TIMESTAMP WITHOUT TIME ZONE, 
	PRIMARY KEY (run_id), 
	FOREIGN KEY(run_id) REFERENCES runs (id)
);

CREATE INDEX ix_run_callbacks_status ON run_callbacks (status);

CREATE TABLE node_cache (
	key VARCHAR(64) NOT NULL, 
	node_type VARCHAR(50) NOT NULL, 
	output JSON, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	expires_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (key)
);

CREATE INDEX ix_node_cache_expires_at ON node_cache (expires_at);
