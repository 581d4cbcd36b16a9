//! The shard allocator's rules (module docs of `comodit_cluster::allocator`), as properties over
//! random tables and as the join/leave/failure examples of DESIGN §7.

use std::collections::{BTreeMap, BTreeSet};

use comodit_cluster::allocator::{allocate, moves};
use comodit_cluster::NodeId;
use proptest::prelude::*;

/// Owned-shard counts of the nodes in `nodes` (0 for a node that owns nothing); other owners are
/// not counted.
fn counts(table: &[Option<NodeId>], nodes: &BTreeSet<NodeId>) -> BTreeMap<NodeId, usize> {
    let mut counts: BTreeMap<NodeId, usize> = nodes.iter().map(|&node| (node, 0)).collect();
    for owner in table.iter().flatten() {
        if let Some(count) = counts.get_mut(owner) {
            *count += 1;
        }
    }
    counts
}

/// The fewest moves any evenly spread table can need, by brute force over every choice of which
/// nodes get the larger share: shards not on a live node, plus each node's surplus over its share.
/// Independent of the allocator's own choice, so it checks that choice is optimal.
fn minimum_moves(live: &BTreeSet<NodeId>, current: &[Option<NodeId>]) -> usize {
    let nodes: Vec<NodeId> = live.iter().copied().collect();
    if nodes.is_empty() {
        return current.iter().filter(|owner| owner.is_some()).count();
    }
    let held = counts(current, live);
    let not_on_live = current
        .iter()
        .filter(|owner| !owner.is_some_and(|o| live.contains(&o)))
        .count();
    let base = current.len() / nodes.len();
    let larger = current.len() % nodes.len();
    (0u32..1 << nodes.len())
        .filter(|mask| mask.count_ones() as usize == larger)
        .map(|mask| {
            let surplus: usize = nodes
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let share = base + usize::from(mask & (1 << i) != 0);
                    held[node].saturating_sub(share)
                })
                .sum();
            not_on_live + surplus
        })
        .min()
        .expect("at least one choice of larger shares")
}

/// Up to 8 live node ids (with repeats) from a small id space, and a table whose owners come from
/// the same space (so some owners are live, some are not) or are `None`.
fn scenario() -> impl Strategy<Value = (Vec<NodeId>, Vec<Option<NodeId>>)> {
    (
        prop::collection::vec(1u64..=10, 0..=8),
        prop::collection::vec(prop::option::weighted(0.8, 1u64..=10), 0..=300),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Rule 1: with a live node, every shard is owned by a live node; with none, nothing is owned.
    #[test]
    fn every_shard_gets_a_live_owner((live, current) in scenario()) {
        let table = allocate(&live, &current);
        prop_assert_eq!(table.len(), current.len());
        for owner in &table {
            match owner {
                Some(node) => prop_assert!(live.contains(node), "owner {} is not live", node),
                None => prop_assert!(live.is_empty(), "unowned shard with live nodes {:?}", live),
            }
        }
    }

    /// Rule 2: owner counts over all live nodes (owning nothing counts as 0) differ by at most one.
    #[test]
    fn spread_is_even((live, current) in scenario()) {
        let table = allocate(&live, &current);
        let live_set: BTreeSet<NodeId> = live.iter().copied().collect();
        let counts = counts(&table, &live_set);
        if let (Some(min), Some(max)) = (counts.values().min(), counts.values().max()) {
            prop_assert!(max - min <= 1, "counts {:?}", counts);
        }
    }

    /// Rule 3: the number of moves is the minimum possible, and only shards of non-live owners or
    /// of live nodes above their share move.
    #[test]
    fn moves_are_fewest((live, current) in scenario()) {
        let table = allocate(&live, &current);
        let live_set: BTreeSet<NodeId> = live.iter().copied().collect();
        let moved = moves(&current, &table);
        prop_assert_eq!(moved.len(), minimum_moves(&live_set, &current));

        let before = counts(&current, &live_set);
        let after = counts(&table, &live_set);
        for (shard, from, _) in &moved {
            if let Some(from) = from.filter(|node| live_set.contains(node)) {
                prop_assert!(
                    before[&from] > after[&from],
                    "shard {} left live node {} which was not above its share", shard, from
                );
            }
        }
        // A live node never both loses and gains shards.
        for node in &live_set {
            let lost = moved.iter().any(|(_, from, _)| *from == Some(*node));
            let gained = moved.iter().any(|(_, _, to)| *to == Some(*node));
            prop_assert!(!(lost && gained), "node {} both lost and gained shards", node);
        }
        // A live node at or below the smaller share keeps everything it has.
        if !live_set.is_empty() {
            let floor = current.len() / live_set.len();
            for (node, &held) in &before {
                if held <= floor {
                    prop_assert!(moved.iter().all(|(_, from, _)| *from != Some(*node)));
                }
            }
        }
    }

    /// Rule 4: the order and repetition of live nodes do not matter, and the result is a fixed
    /// point (allocating again moves nothing).
    #[test]
    fn deterministic_and_stable(
        (live, current) in scenario(),
        shuffle_seed in any::<u64>(),
        repeat in 0usize..3,
    ) {
        let table = allocate(&live, &current);

        let mut permuted = live.clone();
        // A seeded Fisher-Yates so the permutation is part of the (shrinkable) proptest input.
        let mut state = shuffle_seed | 1;
        for i in (1..permuted.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            permuted.swap(i, (state % (i as u64 + 1)) as usize);
        }
        permuted.extend(live.iter().take(repeat).copied());
        prop_assert_eq!(&allocate(&permuted, &current), &table);

        prop_assert_eq!(allocate(&live, &table), table);
    }

    /// `moves` lists exactly the shards that differ, with their old and new owners.
    #[test]
    fn moves_lists_exactly_the_differences(
        before in prop::collection::vec(prop::option::of(1u64..=4), 0..50),
        after in prop::collection::vec(prop::option::of(1u64..=4), 0..50),
    ) {
        let moved = moves(&before, &after);
        let mut rebuilt = before.clone();
        rebuilt.resize(before.len().max(after.len()), None);
        for (shard, from, to) in &moved {
            prop_assert_ne!(from, to);
            prop_assert_eq!(rebuilt[*shard as usize], *from);
            rebuilt[*shard as usize] = *to;
        }
        let mut expected = after.clone();
        expected.resize(rebuilt.len(), None);
        prop_assert_eq!(rebuilt, expected);
        prop_assert!(moved.windows(2).all(|w| w[0].0 < w[1].0), "shard order");
    }
}

fn owned_by(table: &[Option<NodeId>], node: NodeId) -> usize {
    table.iter().filter(|owner| **owner == Some(node)).count()
}

#[test]
fn join_join_fail_with_256_shards() {
    let empty = vec![None; 256];

    // One node: it owns everything.
    let one = allocate(&[1], &empty);
    assert_eq!(owned_by(&one, 1), 256);

    // A second node joins: exactly half moves, all from node 1 to node 2.
    let two = allocate(&[1, 2], &one);
    let moved = moves(&one, &two);
    assert_eq!(moved.len(), 128);
    assert!(moved
        .iter()
        .all(|(_, from, to)| *from == Some(1) && *to == Some(2)));
    assert_eq!((owned_by(&two, 1), owned_by(&two, 2)), (128, 128));

    // A third joins: 85 move to it (43 + 42); the tie goes to node 1, which keeps the larger share.
    let three = allocate(&[3, 1, 2], &two);
    let moved = moves(&two, &three);
    assert_eq!(moved.len(), 85);
    assert!(moved.iter().all(|(_, _, to)| *to == Some(3)));
    assert_eq!(
        (
            owned_by(&three, 1),
            owned_by(&three, 2),
            owned_by(&three, 3)
        ),
        (86, 85, 85)
    );

    // Node 2 dies: only its 85 shards move, to the survivors.
    let survivors = allocate(&[1, 3], &three);
    let moved = moves(&three, &survivors);
    assert_eq!(moved.len(), 85);
    assert!(moved
        .iter()
        .all(|(_, from, to)| *from == Some(2) && *to != Some(2)));
    assert_eq!(
        (owned_by(&survivors, 1), owned_by(&survivors, 3)),
        (128, 128)
    );
}

#[test]
fn more_nodes_than_shards() {
    let table = allocate(&[5, 4, 3, 2, 1], &[None, None, None]);
    // Freed shards fill the lowest ids first, one each.
    assert_eq!(table, vec![Some(1), Some(2), Some(3)]);

    // A node holding two of three shards keeps one; the other goes to the lowest idle id.
    let table = allocate(&[1, 2, 3, 4, 5], &[Some(5), Some(5), Some(4)]);
    assert_eq!(table, vec![Some(5), Some(1), Some(4)]);
}

#[test]
fn duplicate_live_ids_count_once() {
    let table = allocate(&[2, 2, 1, 2], &[None; 4]);
    assert_eq!((owned_by(&table, 1), owned_by(&table, 2)), (2, 2));
}

#[test]
fn shards_of_unknown_owners_are_reassigned() {
    // Node 9 is not live (left or dead): its shards and the unowned one go, in shard order, to the
    // live nodes below their share in id order; node 1 keeps its own.
    let table = allocate(&[2, 1], &[Some(9), Some(1), Some(9), None]);
    assert_eq!(table, vec![Some(1), Some(1), Some(2), Some(2)]);
}
