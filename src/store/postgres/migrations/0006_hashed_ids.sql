
-- Item ids come from upstream: any length, any character (a NUL, which
-- `text` cannot hold; 3,000 bytes, more than a btree entry can). They
-- move to tables keyed by the id's SHA-256 (32 bytes, whatever the id),
-- the id itself kept as bytes in a column no index covers.
CREATE TABLE seen_ids (
    instance text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    id bytea NOT NULL,
    at_ms bigint NOT NULL,
    PRIMARY KEY (instance, key)
);
CREATE TABLE known_items (
    instance text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    id bytea NOT NULL,
    value json NOT NULL,
    PRIMARY KEY (instance, key)
);
-- Texts that come from outside and are no key (why a receiver disabled
-- an endpoint; a refresh token a token server rotated) are kept as bytes,
-- NUL and all.
ALTER TABLE disabled ALTER COLUMN why TYPE bytea USING convert_to(why, 'UTF8');
ALTER TABLE credentials ALTER COLUMN value TYPE bytea USING convert_to(value, 'UTF8');
