-- pgscope demo: schema and seed data. pgscope-demo loads this itself, idempotently, before
-- every scenario (the file is compiled into the program). One statement per ';' at the end of
-- a line: the demo splits there, since a guard sends one statement at a time.
CREATE TABLE IF NOT EXISTS demo_accounts (
    id      int PRIMARY KEY,
    owner   text NOT NULL,
    balance bigint NOT NULL CHECK (balance >= 0) -- the overdraft the rollback scenario hits
);
CREATE TABLE IF NOT EXISTS demo_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    event  text NOT NULL
);
INSERT INTO demo_accounts (id, owner, balance) VALUES
    (1, 'alice', 1000), (2, 'bob', 1000), (3, 'carol', 1000), (4, 'dave', 1000),
    (5, 'erin', 1000), (6, 'frank', 1000), (7, 'grace', 1000), (8, 'heidi', 1000)
ON CONFLICT (id) DO NOTHING;
-- The bulk scenario's own table: loaded with COPY FROM STDIN, exported with COPY TO STDOUT and
-- streamed row by row. The scenario empties it when it starts (nothing else uses it).
CREATE TABLE IF NOT EXISTS demo_bulk (
    id     bigint PRIMARY KEY,
    amount bigint NOT NULL,
    label  text NOT NULL
);
