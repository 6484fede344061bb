
INSERT INTO seen_ids (instance, key, id, at_ms)
SELECT instance, sha256(convert_to(id, 'UTF8')), convert_to(id, 'UTF8'), at_ms FROM seen
ON CONFLICT (instance, key) DO NOTHING;
INSERT INTO known_items (instance, key, id, value)
SELECT instance, sha256(convert_to(id, 'UTF8')), convert_to(id, 'UTF8'), value FROM known
ON CONFLICT (instance, key) DO NOTHING;
DROP TABLE seen;
DROP TABLE known;
