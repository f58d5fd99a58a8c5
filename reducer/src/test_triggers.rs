//! TEST FIXTURE ONLY (feature `test-triggers`): a record whose value contains a marker
//! makes the reducer misbehave on purpose, so tests can prove that the host contains
//! a reducer that traps, loops, eats memory or breaks the output contract, in each
//! call of a batch. The default build has none of this.
//!
//! A marker is `logq-test:<behaviour>` (in the constructor) or
//! `logq-test:<behaviour>@<phase>`, with behaviour `trap`, `loop`, `oom` (memory
//! reserved), `oom-written` (memory written) or `contract`, and phase `ctor`, `plan`
//! or `fold`. The constructor returns nothing the host reads, so `contract@ctor` is
//! not a case.

/// Marker that makes the reducer panic (a trap) in its constructor.
pub const TRAP: &str = "logq-test:trap";
/// Marker that makes the reducer loop forever (cut by the time limit).
pub const LOOP: &str = "logq-test:loop";
/// Marker that makes the reducer allocate without end (cut by the memory limit).
pub const OOM: &str = "logq-test:oom";

/// What a marker asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Panic: a trap.
    Trap,
    /// Loop for ever.
    Loop,
    /// Reserve memory without end.
    Oom,
    /// Allocate and write memory without end.
    OomWritten,
    /// Return output that breaks the contract.
    Contract,
}

/// In which call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `constructor(records)`.
    Constructor,
    /// `plan()`.
    Plan,
    /// `fold(prior)`.
    Fold,
}

/// The first marker in `value`, if any.
pub fn requested(value: &[u8]) -> Option<(Behaviour, Phase)> {
    const PREFIX: &[u8] = b"logq-test:";
    let at = value.windows(PREFIX.len()).position(|w| w == PREFIX)? + PREFIX.len();
    let rest = &value[at..];
    let word = |w: &[u8]| rest.starts_with(w) && rest.get(w.len()).is_none_or(|c| *c != b'-');
    let (behaviour, len) = [
        (Behaviour::OomWritten, &b"oom-written"[..]),
        (Behaviour::Trap, b"trap"),
        (Behaviour::Loop, b"loop"),
        (Behaviour::Oom, b"oom"),
        (Behaviour::Contract, b"contract"),
    ]
    .into_iter()
    .find(|(_, w)| word(w))
    .map(|(b, w)| (b, w.len()))?;
    let phase = match &rest[len..] {
        r if r.starts_with(b"@plan") => Phase::Plan,
        r if r.starts_with(b"@fold") => Phase::Fold,
        _ => Phase::Constructor,
    };
    Some((behaviour, phase))
}

/// Misbehaves as asked (every behaviour but [`Behaviour::Contract`], which the
/// caller acts out on its output); never returns.
pub fn misbehave(behaviour: Behaviour) {
    match behaviour {
        Behaviour::Trap => panic!("test reducer: trap requested"),
        Behaviour::Loop => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Behaviour::Oom => {
            // Reserved, not written: the memory limit cuts it after a few grows, long
            // before a time limit could, even on a loaded machine.
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(Vec::with_capacity(4 << 20));
                std::hint::black_box(&hoard);
            }
        }
        Behaviour::OomWritten => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![0xa5; 4 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Behaviour::Contract => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_name_a_behaviour_and_a_phase() {
        assert_eq!(
            requested(br#"{"username":"logq-test:trap"}"#),
            Some((Behaviour::Trap, Phase::Constructor))
        );
        assert_eq!(
            requested(b"x logq-test:oom-written@fold"),
            Some((Behaviour::OomWritten, Phase::Fold))
        );
        assert_eq!(
            requested(b"logq-test:oom@plan"),
            Some((Behaviour::Oom, Phase::Plan))
        );
        assert_eq!(
            requested(b"logq-test:contract@plan"),
            Some((Behaviour::Contract, Phase::Plan))
        );
        assert_eq!(requested(b"logq-test:nothing"), None);
        assert_eq!(requested(b"fine"), None);
    }
}
