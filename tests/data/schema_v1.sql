-- hl7bridge message log, schema version 1 (as released in 0.1.0); used to test in-place upgrades.
CREATE TABLE meta (
	"key" VARCHAR(64) NOT NULL, 
	value VARCHAR(256) NOT NULL, 
	PRIMARY KEY ("key")
);
CREATE TABLE messages (
	id INTEGER NOT NULL, 
	received_at FLOAT NOT NULL, 
	listener VARCHAR(64) NOT NULL, 
	peer VARCHAR(64) NOT NULL, 
	raw BLOB, 
	charset VARCHAR(32), 
	sending_application VARCHAR(180), 
	sending_facility VARCHAR(180), 
	control_id VARCHAR(199), 
	message_type VARCHAR(8), 
	event VARCHAR(8), 
	version VARCHAR(16), 
	appointment_key VARCHAR(400), 
	action VARCHAR(16), 
	route VARCHAR(64), 
	note TEXT, 
	replay_of INTEGER, 
	summary TEXT, 
	ack_code VARCHAR(2), 
	ack_text TEXT, 
	ack_raw BLOB, 
	status VARCHAR(12) NOT NULL, 
	error TEXT, 
	error_location VARCHAR(32), 
	duplicate_of INTEGER, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_messages_received_at ON messages (received_at);
CREATE INDEX ix_messages_sender_control ON messages (sending_application, sending_facility, control_id);
CREATE INDEX ix_messages_status_received ON messages (status, received_at);
CREATE INDEX ix_messages_event_received ON messages (event, received_at);
CREATE INDEX ix_messages_appointment ON messages (appointment_key);
CREATE TABLE commands (
	id INTEGER NOT NULL, 
	message_id INTEGER NOT NULL, 
	appointment_key VARCHAR(400) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	route VARCHAR(64) NOT NULL, 
	chat_bot_id VARCHAR(128) NOT NULL, 
	time_zone VARCHAR(64) NOT NULL, 
	flow_id VARCHAR(128), 
	parameters TEXT NOT NULL, 
	identifiers TEXT NOT NULL, 
	start_at FLOAT, 
	status VARCHAR(12) NOT NULL, 
	step VARCHAR(16) NOT NULL, 
	outcome TEXT, 
	attempts INTEGER NOT NULL, 
	next_attempt_at FLOAT NOT NULL, 
	sync INTEGER NOT NULL, 
	replay_of INTEGER, 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_commands_status_due ON commands (status, next_attempt_at);
CREATE INDEX ix_commands_appointment ON commands (appointment_key, id);
CREATE INDEX ix_commands_message ON commands (message_id);
CREATE TABLE attempts (
	id INTEGER NOT NULL, 
	command_id INTEGER NOT NULL, 
	call_id VARCHAR(36) NOT NULL, 
	at FLOAT NOT NULL, 
	operation VARCHAR(16) NOT NULL, 
	request_summary TEXT NOT NULL, 
	status_code INTEGER, 
	verdict VARCHAR(12) NOT NULL, 
	response_body TEXT, 
	error TEXT, 
	duration_ms FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_attempts_at ON attempts (at);
CREATE INDEX ix_attempts_command ON attempts (command_id);
CREATE TABLE appointments (
	appointment_key VARCHAR(400) NOT NULL, 
	route VARCHAR(64) NOT NULL, 
	chat_bot_id VARCHAR(128) NOT NULL, 
	state VARCHAR(12) NOT NULL, 
	parameters TEXT, 
	updated_at FLOAT NOT NULL, 
	last_command_id INTEGER, 
	PRIMARY KEY (appointment_key)
)
;
INSERT INTO meta (key, value) VALUES ('schema_version', '1');
