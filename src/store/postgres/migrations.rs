//! The schema's versions as numbered `.sql` files (`migrations/`),
//! embedded at build time. Each file is byte for byte the SQL the version
//! always had: a database migrated by an older build is at the same
//! version here.

/// The schema's versions, applied in order at open, each in the same
/// transaction as its `schema_migrations` row.
///
/// A hand-written list rather than a migration crate (refinery, sqlx): one
/// backend with a handful of statements does not need a second dependency
/// tree, and the list runs under *our* advisory lock in *our* transaction
/// (refinery takes no lock across processes, so two daemons starting
/// together could both apply version 1). Never edit a released version:
/// add the next one.
pub(super) const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_base.sql")),
    (2, include_str!("migrations/0002_cluster.sql")),
    (3, include_str!("migrations/0003_credentials.sql")),
    (4, include_str!("migrations/0004_seen_known.sql")),
    (5, include_str!("migrations/0005_split_states.sql")),
    (
        6,
        concat!(include_str!("migrations/0006_hashed_ids.sql"), move_ids!()),
    ),
    (7, include_str!("migrations/0007_hot_leases.sql")),
    (8, include_str!("migrations/0008_heartbeat_leases.sql")),
];

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;
    use sha2::Digest;

    /// Every version is the SQL it always was (these are the SHA-256 of
    /// the strings the list held before it became files): a database
    /// migrated by an older build must never see a version change under it.
    #[test]
    fn every_version_is_byte_identical_to_the_one_released() {
        let want = [
            (
                1,
                "d1b18e1ed3fedd76bb1872de494ecccddfcf12706251202db617e4bd2388fc7f",
            ),
            (
                2,
                "b9d5cc41d7bc199d788b60caa2b1e566d3439781161f7b145533e467824a8c59",
            ),
            (
                3,
                "89786fea33640167482e951446f95f802026356c5efe6038f5f9154a01a5628a",
            ),
            (
                4,
                "a77b5763db7e1b971617a4a5a1bdde9787b174d140ff255bb77ae9bcfb77d64f",
            ),
            (
                5,
                "ff7db32d6ab9124898db1e7a9ed7ec14b71c78c3eea27c5eebbb9c47f4378763",
            ),
            (
                6,
                "d03675bea0e09378946b6c36cb93c9fd7c077aa046b8683a2deee82ae3b52479",
            ),
            (
                7,
                "e6593aaa364bcfce2715b34f7074f3f025e8abcf886a29e313d95cc090604a60",
            ),
            (
                8,
                "a9d8d80a8c1b5cb4204bf9fbb0b54a87913c8607cb6e79efe449004203d9fc47",
            ),
        ];
        let got: Vec<(i32, String)> = MIGRATIONS
            .iter()
            .map(|(v, sql)| {
                let d = sha2::Sha256::digest(sql.as_bytes());
                (*v, d.iter().map(|b| format!("{b:02x}")).collect())
            })
            .collect();
        let want: Vec<(i32, String)> = want.iter().map(|(v, h)| (*v, h.to_string())).collect();
        assert_eq!(got, want);
    }
}
