
-- States written before carry their sets inline: they move out. Times are
-- aligned at the back of `seen` (ids older than `seen_at` count as seen
-- now, as detection counts them).
INSERT INTO seen (instance, id, at_ms)
SELECT s.instance, e.id,
       CASE WHEN e.n > d.missing
            THEN (s.value->'seen_at'->>((e.n - 1 - d.missing)::int))::bigint
            ELSE now_ms() END
FROM state s
CROSS JOIN LATERAL (
    SELECT json_array_length(s.value->'seen')
         - COALESCE(json_array_length(s.value->'seen_at'), 0) AS missing
) d
CROSS JOIN LATERAL json_array_elements_text(s.value->'seen') WITH ORDINALITY AS e(id, n)
WHERE json_typeof(s.value->'seen') = 'array'
ON CONFLICT (instance, id) DO NOTHING;
INSERT INTO known (instance, id, value)
SELECT s.instance, k.key, k.value
FROM state s CROSS JOIN LATERAL json_each(s.value->'known') k
WHERE json_typeof(s.value->'known') = 'object'
ON CONFLICT (instance, id) DO NOTHING;
UPDATE state SET value = (value::jsonb - 'seen' - 'seen_at' - 'known')::json
WHERE value->'seen' IS NOT NULL OR value->'seen_at' IS NOT NULL OR value->'known' IS NOT NULL;
