//! Load balancing: which target of an upstream takes the next request.
//!
//! Every algorithm skips targets that are unhealthy or ejected, and avoids the target a
//! request just failed on when another one is usable.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use xxhash_rust::xxh3::xxh3_64;

use super::target::Targets;
use crate::config::{self, HashOn, LoadBalancing};

/// Points on the hash ring per unit of weight.
const RING_POINTS_PER_WEIGHT: u32 = 64;

#[derive(Debug)]
pub struct Balancer {
    next: AtomicUsize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    RoundRobin,
    /// Target indexes in the order smooth weighted round robin visits them over one cycle.
    Weighted(Box<[usize]>),
    LeastRequest,
    /// Sorted `(point, target)` pairs.
    ConsistentHash(Box<[(u64, usize)]>, HashOn),
}

// === impl Balancer ===

impl Balancer {
    pub fn new(settings: &config::Upstream) -> Balancer {
        let weights: Vec<u32> = settings.targets.iter().map(|t| t.weight()).collect();
        let kind = match (settings.load_balancing, &settings.hash_on) {
            (LoadBalancing::RoundRobin, _) => Kind::RoundRobin,
            (LoadBalancing::WeightedRoundRobin, _) => Kind::Weighted(smooth_schedule(&weights)),
            (LoadBalancing::LeastRequest, _) => Kind::LeastRequest,
            (LoadBalancing::ConsistentHash, Some(hash_on)) => {
                let addresses = settings.targets.iter().map(|t| t.address());
                Kind::ConsistentHash(ring(addresses, &weights), hash_on.clone())
            }
            // NB: the config check refuses consistent hashing without a key.
            (LoadBalancing::ConsistentHash, None) => Kind::RoundRobin,
        };
        Balancer {
            next: AtomicUsize::new(0),
            kind,
        }
    }

    /// The hash of the request's key, when the upstream balances on one and the request has it.
    pub fn key(&self, headers: &HeaderMap, client: IpAddr) -> Option<u64> {
        let Kind::ConsistentHash(_, hash_on) = &self.kind else {
            return None;
        };
        match hash_on {
            HashOn::ClientAddress => Some(match client {
                IpAddr::V4(ip) => xxh3_64(&ip.octets()),
                IpAddr::V6(ip) => xxh3_64(&ip.octets()),
            }),
            HashOn::Header(name) => headers.get(name).map(|v| xxh3_64(v.as_bytes())),
            HashOn::Cookie(name) => cookie(headers, name).map(|v| xxh3_64(v.as_bytes())),
        }
    }

    /// The target for the next attempt: a usable one other than `avoid` if there is one, else
    /// `avoid` if it is usable; `None` when no target is usable.
    pub fn pick(&self, targets: &Targets, key: Option<u64>, avoid: Option<usize>) -> Option<usize> {
        let preferred = |index: usize| Some(index) != avoid && targets.usable(index);
        self.pick_where(targets, key, preferred)
            .or_else(|| avoid.filter(|&index| targets.usable(index)))
    }

    fn pick_where(
        &self,
        targets: &Targets,
        key: Option<u64>,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let count = targets.list.len();
        match (&self.kind, key) {
            (Kind::ConsistentHash(ring, _), Some(key)) => walk_ring(ring, key, usable),
            (Kind::Weighted(schedule), _) => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed);
                // The schedule is as long as the weights' sum: walk it only when a target is
                // out of use.
                if (0..count).all(&usable) {
                    return Some(schedule[turn % schedule.len()]);
                }
                nth_turn(
                    schedule.iter().copied().filter(|&index| usable(index)),
                    turn,
                )
            }
            (Kind::LeastRequest, _) => least_of_two(targets, usable),
            (Kind::RoundRobin | Kind::ConsistentHash(..), _) => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed);
                nth_turn((0..count).filter(|&index| usable(index)), turn)
            }
        }
    }
}

/// The target whose turn `turn` is, among `usable` in order: the turns of targets out of use
/// are shared evenly by the others, not all given to the next one in line.
fn nth_turn(mut usable: impl Iterator<Item = usize> + Clone, turn: usize) -> Option<usize> {
    let count = usable.clone().count();
    usable.nth(turn.checked_rem(count)?)
}

/// Power of two choices: of two usable targets drawn at random, the one with fewer requests
/// in flight for its weight.
fn least_of_two(targets: &Targets, usable: impl Fn(usize) -> bool) -> Option<usize> {
    let count = (0..targets.list.len()).filter(|&i| usable(i)).count();
    let nth_usable = |n: usize| (0..targets.list.len()).filter(|&i| usable(i)).nth(n);
    match count {
        0 => None,
        1 => nth_usable(0),
        _ => {
            let first = rand::random_range(0..count);
            let second = (first + rand::random_range(1..count)) % count;
            let (a, b) = (nth_usable(first)?, nth_usable(second)?);
            // Compare in_flight / weight without division.
            let load = |i: usize, other: usize| {
                u64::from(targets.in_flight(i)) * u64::from(targets.list[other].weight)
            };
            Some(if load(b, a) < load(a, b) { b } else { a })
        }
    }
}

fn walk_ring(ring: &[(u64, usize)], key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
    let start = ring.partition_point(|&(point, _)| point < key);
    (0..ring.len())
        .map(|step| ring[(start + step) % ring.len()].1)
        .find(|&index| usable(index))
}

/// One cycle of smooth weighted round robin: each target appears as often as its weight,
/// spread out rather than in runs.
fn smooth_schedule(weights: &[u32]) -> Box<[usize]> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (current, weight) in current.iter_mut().zip(&weights) {
                *current += weight;
            }
            let (best, _) = current
                .iter()
                .enumerate()
                .max_by_key(|&(index, value)| (*value, std::cmp::Reverse(index)))
                .unwrap_or((0, &0));
            current[best] -= total;
            best
        })
        .collect()
}

fn ring<'a>(addresses: impl Iterator<Item = &'a str>, weights: &[u32]) -> Box<[(u64, usize)]> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut ring: Vec<(u64, usize)> = addresses
        .enumerate()
        .flat_map(|(index, address)| {
            let points = weights[index] / divisor * RING_POINTS_PER_WEIGHT;
            (0..points).map(move |point| (xxh3_64(format!("{address}#{point}").as_bytes()), index))
        })
        .collect();
    ring.sort_unstable();
    ring.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .find_map(|cookie| {
            let cookie = cookie.ok()?;
            (cookie.name() == name).then(|| cookie.value_raw())
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_schedule_interleaves_by_weight() {
        assert_eq!(&*smooth_schedule(&[1, 3]), [1, 0, 1, 1]);
        assert_eq!(&*smooth_schedule(&[2, 2]), [0, 1]);
        let schedule = smooth_schedule(&[5, 1, 1]);
        assert_eq!(schedule.len(), 7);
        assert_eq!(schedule.iter().filter(|&&i| i == 0).count(), 5);
    }

    #[test]
    fn the_turns_of_a_target_out_of_use_are_shared_evenly() {
        let usable = || [0, 1, 2].into_iter().filter(|&i| i != 0);
        let picks: Vec<_> = (0..6).map(|turn| nth_turn(usable(), turn)).collect();
        assert_eq!(picks, [1, 2, 1, 2, 1, 2].map(Some));
        assert_eq!(nth_turn(std::iter::empty(), 3), None);
    }

    #[test]
    fn cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", "a=1; session=abc; b=2".parse().expect("valid"));
        assert_eq!(cookie(&headers, "session"), Some("abc"));
        assert_eq!(cookie(&headers, "missing"), None);
    }
}
