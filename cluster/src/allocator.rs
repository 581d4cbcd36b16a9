//! Shard allocation: which node owns which shard (DESIGN §4, §7).
//!
//! The Raft leader calls [`allocate`] whenever the set of nodes allowed to own shards changes (a node
//! joins, leaves gracefully or is declared dead once its lease has surely expired) and proposes the
//! resulting table; [`moves`] tells which shards change hands, and each of them gets a new epoch. The
//! function is pure: plain data in, plain data out, no clock, no randomness, so every replica and
//! every test can recompute it.
//!
//! The rules, in order of importance:
//!
//! 1. **Every shard has a live owner** as soon as there is one live node. With no live node every
//!    shard is unowned (`None`).
//! 2. **Even spread.** With `n` shards and `k` live nodes, `n % k` nodes own `ceil(n / k)` shards and
//!    the others `floor(n / k)`, so owner counts differ by at most one.
//! 3. **Fewest moves.** A move costs a handoff (the old owner drains, the new one reloads its host
//!    actors), so the table changes as little as the spread allows. Which nodes get the `n % k` larger
//!    shares is the only freedom, and it goes to the nodes that hold the most shards already: that
//!    minimises the total surplus, hence the moves (exchanging a larger share from a node holding
//!    more shards to one holding fewer never lowers the surplus). Shards move only if their owner is
//!    not live (dead, left, or unowned) or is a live node above its share; a live node never both
//!    loses and gains shards.
//! 4. **Deterministic and stable.** `live_nodes` is sorted and de-duplicated first, so its order and
//!    repetitions do not matter. Ties are broken by node id (the lower id gets the larger share), a
//!    node above its share keeps its lowest-numbered shards, and freed shards go in ascending order to
//!    the nodes below their share in ascending id order. Applying `allocate` to its own output
//!    changes nothing.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::NodeId;

/// The owner of every shard (index = shard number) after allocating `current` over `live_nodes`.
/// `None` = unowned (there is no live node). See the module docs for the rules.
pub fn allocate(live_nodes: &[NodeId], current: &[Option<NodeId>]) -> Vec<Option<NodeId>> {
    let mut nodes = live_nodes.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.is_empty() {
        return vec![None; current.len()];
    }

    // The shards each live node holds now (ascending), and those held by nobody live.
    let mut held: BTreeMap<NodeId, Vec<usize>> =
        nodes.iter().map(|&node| (node, Vec::new())).collect();
    let mut free = Vec::new();
    for (shard, owner) in current.iter().enumerate() {
        match owner.and_then(|owner| held.get_mut(&owner)) {
            Some(shards) => shards.push(shard),
            None => free.push(shard),
        }
    }

    // The larger shares go to the nodes holding the most shards (fewest moves), lower id first.
    let base = current.len() / nodes.len();
    let larger = current.len() % nodes.len();
    let mut by_holdings = nodes.clone();
    by_holdings.sort_by_key(|node| (Reverse(held[node].len()), *node));
    let target: BTreeMap<NodeId, usize> = by_holdings
        .iter()
        .enumerate()
        .map(|(rank, &node)| (node, base + usize::from(rank < larger)))
        .collect();

    // Surplus: a node above its share keeps its lowest-numbered shards and frees the rest.
    for (node, shards) in held.iter_mut() {
        let keep = target[node];
        if shards.len() > keep {
            free.extend(shards.drain(keep..));
        }
    }
    free.sort_unstable();

    // The freed shards fill the nodes below their share; the shares add up to the shard count, so
    // the freed shards are exactly enough.
    let mut table = current.to_vec();
    let mut free = free.into_iter();
    for (node, shards) in &held {
        for _ in shards.len()..target[node] {
            let shard = free
                .next()
                .expect("shares add up to the shard count, so every deficit has a freed shard");
            table[shard] = Some(*node);
        }
    }
    debug_assert!(free.next().is_none(), "every freed shard got an owner");
    table
}

/// The shards whose owner differs between two tables, as `(shard, before, after)` in shard order:
/// what a rebalance moves. A shard missing from the shorter table counts as unowned there.
pub fn moves(
    before: &[Option<NodeId>],
    after: &[Option<NodeId>],
) -> Vec<(u32, Option<NodeId>, Option<NodeId>)> {
    let len = before.len().max(after.len());
    // Shard numbers are u32 (DESIGN §4: `n_shards` is a u32 fixed at cluster creation), so a table
    // never has more than u32::MAX entries.
    (0u32..)
        .zip(0..len)
        .filter_map(|(shard, index)| {
            let from = before.get(index).copied().flatten();
            let to = after.get(index).copied().flatten();
            (from != to).then_some((shard, from, to))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_live_node_leaves_every_shard_unowned() {
        assert_eq!(allocate(&[], &[Some(1), None, Some(2)]), vec![None; 3]);
        assert_eq!(allocate(&[], &[]), Vec::<Option<NodeId>>::new());
    }

    #[test]
    fn no_shards_is_an_empty_table() {
        assert!(allocate(&[1, 2, 3], &[]).is_empty());
    }

    #[test]
    fn surplus_node_keeps_its_lowest_shards() {
        // Node 1 holds all four; node 2 joins and takes the two highest.
        let table = allocate(&[1, 2], &[Some(1); 4]);
        assert_eq!(table, vec![Some(1), Some(1), Some(2), Some(2)]);
    }

    #[test]
    fn moves_treats_missing_entries_as_unowned() {
        assert_eq!(
            moves(&[Some(1)], &[Some(1), Some(2)]),
            vec![(1, None, Some(2))]
        );
        assert_eq!(
            moves(&[Some(1), Some(3)], &[Some(1)]),
            vec![(1, Some(3), None)]
        );
        assert!(moves(&[None, None], &[]).is_empty());
    }
}
