
-- Seen ids (`new`) and known items (`changes`), one row each, apart from
-- the state record: a commit writes the rows that changed, not the whole
-- set (see records::StateWrite).
CREATE TABLE seen (
    instance text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    at_ms bigint NOT NULL,
    PRIMARY KEY (instance, id)
);
CREATE TABLE known (
    instance text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    value json NOT NULL,
    PRIMARY KEY (instance, id)
);
