//! The SSRF guard of deliveries: endpoint names must not resolve to private,
//! link-local or otherwise non-public addresses (a cloud metadata service at
//! 169.254.169.254, an internal admin panel at 10.0.0.5) unless the endpoint
//! allows it. Loopback stays allowed: agents run next to pollhook.
//!
//! Checked twice, for a reason each: address literals at config load (a
//! clear error with file and line), and names at every connection, through
//! the client's resolver (a name can point anywhere, and can change). Both
//! ask the one pure function [`is_private`], so a literal refused at load is
//! refused when a name resolves to it, and the other way round.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// One block of a special-purpose registry: its first address, prefix
/// length, whether a delivery may reach it (IANA's "Globally Reachable"),
/// and its name in the registry.
type Row<A> = (A, u8, bool, &'static str);

/// The IANA IPv4 Special-Purpose Address Registry (RFC 6890 and its
/// updates), plus multicast (`224/4`, its own registry). The most specific
/// block holding an address decides; an address in no block is public.
/// Every block the registry does not mark globally reachable is refused,
/// the deprecated 6to4 relay anycast too (`N/A`: no one should send there).
const V4: &[Row<[u8; 4]>] = &[
    ([0, 0, 0, 0], 8, false, "this network"),
    ([10, 0, 0, 0], 8, false, "private-use"),
    ([100, 64, 0, 0], 10, false, "shared address space (CGN)"),
    // Loopback is refused by the registry, allowed here: agents run next
    // to pollhook (`is_private` answers it before the table).
    ([127, 0, 0, 0], 8, false, "loopback"),
    ([169, 254, 0, 0], 16, false, "link-local"),
    ([172, 16, 0, 0], 12, false, "private-use"),
    ([192, 0, 0, 0], 24, false, "IETF protocol assignments"),
    ([192, 0, 0, 0], 29, false, "IPv4 service continuity prefix"),
    ([192, 0, 0, 8], 32, false, "IPv4 dummy address"),
    ([192, 0, 0, 9], 32, true, "port control protocol anycast"),
    ([192, 0, 0, 10], 32, true, "TURN anycast"),
    ([192, 0, 0, 170], 32, false, "NAT64/DNS64 discovery"),
    ([192, 0, 0, 171], 32, false, "NAT64/DNS64 discovery"),
    ([192, 0, 2, 0], 24, false, "documentation (TEST-NET-1)"),
    ([192, 31, 196, 0], 24, true, "AS112-v4"),
    ([192, 52, 193, 0], 24, true, "AMT"),
    ([192, 88, 99, 0], 24, false, "deprecated 6to4 relay anycast"),
    ([192, 88, 99, 2], 32, true, "6a44 relay anycast"),
    ([192, 168, 0, 0], 16, false, "private-use"),
    ([192, 175, 48, 0], 24, true, "AS112 direct delegation"),
    ([198, 18, 0, 0], 15, false, "benchmarking"),
    ([198, 51, 100, 0], 24, false, "documentation (TEST-NET-2)"),
    ([203, 0, 113, 0], 24, false, "documentation (TEST-NET-3)"),
    ([224, 0, 0, 0], 4, false, "multicast"),
    ([240, 0, 0, 0], 4, false, "reserved"),
    ([255, 255, 255, 255], 32, false, "limited broadcast"),
];

/// The IANA IPv6 Special-Purpose Address Registry (RFC 6890 and its
/// updates), plus what is not public unicast outside it: the rest of
/// `::/16`, site-local `fec0::/10` (deprecated, still routed by some
/// stacks) and multicast `ff00::/8`. Forms that carry an IPv4 address
/// (IPv4-mapped, NAT64 `64:ff9b::/96`, 6to4, Teredo) are judged by that
/// address before the table (see [`embedded_v4`]). ORCHIDv2 is refused
/// although the registry calls it reachable: ORCHIDs are identifiers that
/// RFC 7343 keeps off the IP layer, so no agent listens there.
const V6: &[Row<[u16; 8]>] = &[
    ([0, 0, 0, 0, 0, 0, 0, 0], 16, false, "reserved (::/16)"),
    ([0, 0, 0, 0, 0, 0, 0, 0], 128, false, "unspecified"),
    ([0, 0, 0, 0, 0, 0, 0, 1], 128, false, "loopback"),
    (
        [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
        48,
        false,
        "NAT64 local use",
    ),
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, false, "discard-only"),
    ([0x100, 0, 0, 1, 0, 0, 0, 0], 64, false, "dummy IPv6 prefix"),
    (
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        false,
        "IETF protocol assignments",
    ),
    (
        [0x2001, 1, 0, 0, 0, 0, 0, 1],
        128,
        true,
        "port control protocol anycast",
    ),
    ([0x2001, 1, 0, 0, 0, 0, 0, 2], 128, true, "TURN anycast"),
    (
        [0x2001, 1, 0, 0, 0, 0, 0, 3],
        128,
        true,
        "DNS-SD SRP anycast",
    ),
    ([0x2001, 2, 0, 0, 0, 0, 0, 0], 48, false, "benchmarking"),
    ([0x2001, 3, 0, 0, 0, 0, 0, 0], 32, true, "AMT"),
    ([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48, true, "AS112-v6"),
    (
        [0x2001, 0x10, 0, 0, 0, 0, 0, 0],
        28,
        false,
        "deprecated ORCHID",
    ),
    ([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, false, "ORCHIDv2"),
    (
        [0x2001, 0x30, 0, 0, 0, 0, 0, 0],
        28,
        true,
        "drone remote ID (DET)",
    ),
    (
        [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
        32,
        false,
        "documentation",
    ),
    (
        [0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0],
        48,
        true,
        "AS112 direct delegation",
    ),
    ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, false, "documentation"),
    (
        [0x5f00, 0, 0, 0, 0, 0, 0, 0],
        16,
        false,
        "segment routing (SRv6) SIDs",
    ),
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, false, "unique-local"),
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, false, "link-local"),
    (
        [0xfec0, 0, 0, 0, 0, 0, 0, 0],
        10,
        false,
        "site-local (deprecated)",
    ),
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, false, "multicast"),
];

/// The most specific row holding `addr` (bits as an integer of `width`
/// bits), if any.
fn lookup<A: Copy>(
    rows: &'static [Row<A>],
    addr: u128,
    width: u8,
    bits: impl Fn(A) -> u128,
) -> Option<&'static Row<A>> {
    rows.iter()
        .filter(|r| {
            let shift = width - r.1;
            r.1 == 0 || (addr >> shift) == (bits(r.0) >> shift)
        })
        .max_by_key(|r| r.1)
}

fn v4_row(v4: Ipv4Addr) -> Option<&'static Row<[u8; 4]>> {
    lookup(V4, u32::from(v4) as u128, 32, |a| {
        u32::from_be_bytes(a) as u128
    })
}

fn v6_row(v6: Ipv6Addr) -> Option<&'static Row<[u16; 8]>> {
    lookup(V6, u128::from(v6), 128, |a| u128::from(Ipv6Addr::from(a)))
}

/// True for every address a delivery must not reach without
/// `allow_private`: every block of the IANA special-purpose registries not
/// marked globally reachable ([`V4`], [`V6`]), and multicast, except
/// loopback. An IPv6 address that carries an IPv4 address (IPv4-mapped,
/// IPv4-compatible, SIIT, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo)
/// is judged by the IPv4 address, because that is where the packets end
/// up (`[::ffff:10.0.0.1]` and `[64:ff9b::a9fe:a9fe]` reach 10.0.0.1 and
/// 169.254.169.254).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6),
    }
}

fn is_private_v4(v4: Ipv4Addr) -> bool {
    !v4.is_loopback() && v4_row(v4).is_some_and(|r| !r.2)
}

fn is_private_v6(v6: Ipv6Addr) -> bool {
    if v6.is_loopback() {
        return false;
    }
    if v6.is_unspecified() {
        return true;
    }
    if let Some(v4) = embedded_v4(v6) {
        return is_private_v4(v4);
    }
    v6_row(v6).is_some_and(|r| !r.2)
}
/// The IPv4 address an IPv6 address carries, in the forms that route to it.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // IPv4-mapped ::ffff:a.b.c.d and IPv4-compatible ::a.b.c.d.
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(last),
        // SIIT IPv4-translated ::ffff:0:a.b.c.d.
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(last),
        // NAT64 well-known prefix 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last),
        // 6to4 2002:a.b.c.d::/48.
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        // Teredo 2001:0::/32: the client's address, obfuscated (inverted).
        [0x2001, 0, ..] => Some(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15])),
        _ => None,
    }
}

/// A resolver that drops private addresses (see [`is_private`]); a name
/// with nothing else left fails to resolve with a message saying why.
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !is_private(a.ip()))
                .collect();
            if allowed.is_empty() && !all.is_empty() {
                return Err(format!(
                    "{host} resolves only to private, link-local or other non-public addresses; refused by the SSRF guard (set `allow_private: true` on the endpoint to allow it)"
                )
                .into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row: an address and whether the guard refuses it.
    const TABLE: &[(&str, bool)] = &[
        // IPv4 private and special-purpose ranges.
        ("10.0.0.5", true),
        ("172.16.3.4", true),
        ("192.168.1.1", true),
        ("169.254.169.254", true),
        ("100.64.0.1", true),
        ("0.0.0.0", true),
        ("0.1.2.3", true),
        ("192.0.0.8", true),
        ("192.0.2.1", true),
        ("198.18.0.1", true),
        ("198.19.255.254", true),
        ("198.51.100.7", true),
        ("203.0.113.9", true),
        ("224.0.0.1", true),
        ("239.255.255.250", true),
        ("240.0.0.1", true),
        ("255.255.255.255", true),
        // IPv6 ranges.
        ("::", true),
        ("fd00::1", true),
        ("fe80::1", true),
        ("fec0::1", true),
        ("ff02::1", true),
        ("100::1", true),
        ("2001:db8::1", true),
        ("64:ff9b:1::a00:1", true),
        // IPv4 embedded in IPv6: judged by the IPv4 address.
        ("::ffff:10.0.0.1", true),
        ("::ffff:169.254.169.254", true),
        ("::a00:1", true),
        ("::10.0.0.1", true),
        ("::ffff:0:10.0.0.1", true),
        ("64:ff9b::a00:1", true),
        ("64:ff9b::a9fe:a9fe", true),
        ("2002:a00:1::", true),
        ("2002:a9fe:a9fe::1", true),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", true), // Teredo client 10.0.0.1
        // Allowed: loopback in every form, public unicast.
        ("127.0.0.1", false),
        ("127.5.5.5", false),
        ("::1", false),
        ("::ffff:127.0.0.1", false),
        ("8.8.8.8", false),
        ("100.128.0.1", false),
        ("198.20.0.1", false),
        ("192.0.1.1", false),
        ("223.255.255.255", false),
        ("2606:4700::1", false),
        ("::ffff:8.8.8.8", false),
        ("64:ff9b::808:808", false),
        ("2002:808:808::1", false),
    ];

    /// One address per registry row (inside it, in no more specific row),
    /// with whether the registry says it is reachable; written from the
    /// registries, not from the table, which must agree with them.
    const REGISTRY: &[(&str, bool)] = &[
        ("0.0.0.9", false),
        ("10.20.30.40", false),
        ("100.127.255.254", false),
        ("127.1.2.3", true), // loopback: refused by the registry, allowed here
        ("169.254.1.1", false),
        ("172.31.255.255", false),
        ("192.0.0.200", false),
        ("192.0.0.1", false),
        ("192.0.0.8", false),
        ("192.0.0.9", true),
        ("192.0.0.10", true),
        ("192.0.0.170", false),
        ("192.0.0.171", false),
        ("192.0.2.255", false),
        ("192.31.196.1", true),
        ("192.52.193.1", true),
        ("192.88.99.1", false),
        ("192.88.99.2", true),
        ("192.168.255.1", false),
        ("192.175.48.1", true),
        ("198.19.0.1", false),
        ("198.51.100.1", false),
        ("203.0.113.255", false),
        ("230.1.2.3", false),
        ("250.1.2.3", false),
        ("255.255.255.255", false),
        ("0:1::1", false),
        ("::", false),
        ("::1", true), // loopback, allowed
        ("64:ff9b:1:ffff::1", false),
        ("100::ffff", false),
        ("100:0:0:1::5", false),
        ("2001:1ff::1", false),
        ("2001:1::1", true),
        ("2001:1::2", true),
        ("2001:1::3", true),
        ("2001:2::1", false),
        ("2001:2:0:ffff::1", false),
        ("2001:3:1::1", true),
        ("2001:4:112::1", true),
        ("2001:10::1", false),
        ("2001:20::1", false),
        ("2001:2f:ffff::1", false),
        ("2001:30::1", true),
        ("2001:db8:1::1", false),
        ("2620:4f:8000::1", true),
        ("3fff::1", false),
        ("3fff:fff:ffff::1", false),
        ("5f00::1", false),
        ("5f00:ffff::1", false),
        ("fc00::1", false),
        ("fe80::1", false),
        ("fec0::1", false),
        ("ff0e::1", false),
    ];

    #[test]
    fn every_registry_row_has_its_verdict() {
        let mut covered = std::collections::BTreeSet::new();
        for (ip, reachable) in REGISTRY {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(is_private(ip), !reachable, "{ip}");
            let row = match ip {
                IpAddr::V4(a) => v4_row(a).map(|r| (4, r.0.map(u16::from).to_vec(), r.1)),
                IpAddr::V6(a) => v6_row(a).map(|r| (6, r.0.to_vec(), r.1)),
            };
            assert!(row.is_some(), "{ip} is in no row");
            covered.insert(row);
        }
        // Every row of both tables was the one deciding for some address.
        assert_eq!(
            covered.len(),
            V4.len() + V6.len(),
            "a row without its address"
        );
    }

    #[test]
    fn the_registries_reachable_blocks_around_refused_ones_stay_reachable() {
        for ip in [
            "2001:3::1",
            "2001:200::1",
            "3fff:1000::1",
            "5eff::1",
            "5f01::1",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn the_guard_refuses_every_non_public_range_in_every_form() {
        let wrong: Vec<String> = TABLE
            .iter()
            .filter(|(ip, refused)| is_private(ip.parse().unwrap()) != *refused)
            .map(|(ip, refused)| {
                format!(
                    "{ip} should be {}",
                    if *refused { "refused" } else { "allowed" }
                )
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[tokio::test]
    async fn the_resolver_keeps_loopback() {
        let addrs: Vec<SocketAddr> = GuardedResolver
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
