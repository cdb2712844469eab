//! An alert's lifecycle, shared by every detector: `firing` once when its
//! condition starts to hold, `resolved` once after the condition has been
//! clear for a hold-down — never repeated every window, no flapping.

/// What the caller has to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Fired { started_ns: u64 },
    Resolved { started_ns: u64, ended_ns: u64 },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Quiet,
    Firing {
        started_ns: u64,
        /// When the condition was first seen clear since it last held.
        clear_since_ns: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Lifecycle {
    phase: Phase,
}

impl Lifecycle {
    /// Feeds the condition as evaluated at `now_ns`: `Some(started_ns)`
    /// while it holds (when it started), `None` while it is clear.
    pub fn update(
        &mut self,
        condition: Option<u64>,
        now_ns: u64,
        resolve_after_ns: u64,
    ) -> Option<Transition> {
        match (&mut self.phase, condition) {
            (Phase::Quiet, None) => None,
            (Phase::Quiet, Some(started_ns)) => {
                self.phase = Phase::Firing {
                    started_ns,
                    clear_since_ns: None,
                };
                Some(Transition::Fired { started_ns })
            }
            (Phase::Firing { clear_since_ns, .. }, Some(_)) => {
                *clear_since_ns = None;
                None
            }
            (
                Phase::Firing {
                    started_ns,
                    clear_since_ns,
                },
                None,
            ) => {
                let ended_ns = *clear_since_ns.get_or_insert(now_ns);
                if now_ns.saturating_sub(ended_ns) < resolve_after_ns {
                    return None;
                }
                let started_ns = *started_ns;
                self.phase = Phase::Quiet;
                Some(Transition::Resolved {
                    started_ns,
                    ended_ns,
                })
            }
        }
    }

    pub fn is_firing(&self) -> bool {
        matches!(self.phase, Phase::Firing { .. })
    }

    /// When the firing alert started.
    pub fn firing_since(&self) -> Option<u64> {
        match self.phase {
            Phase::Firing { started_ns, .. } => Some(started_ns),
            Phase::Quiet => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn fires_once_and_resolves_once_after_the_hold_down() {
        let mut lifecycle = Lifecycle::default();
        let mut transitions = Vec::new();
        // Holds from 1 s to 5 s, clear from 6 s on; hold-down 10 s.
        for second in 0..30 {
            let condition = (1..=5).contains(&second).then_some(S);
            transitions.extend(lifecycle.update(condition, second * S, 10 * S));
        }
        assert_eq!(
            transitions,
            vec![
                Transition::Fired { started_ns: S },
                Transition::Resolved {
                    started_ns: S,
                    ended_ns: 6 * S
                }
            ]
        );
        assert!(!lifecycle.is_firing());
    }

    #[test]
    fn a_condition_that_returns_within_the_hold_down_keeps_one_alert() {
        let mut lifecycle = Lifecycle::default();
        let mut transitions = Vec::new();
        // On and off every 3 s: one incident, not a flapping alert.
        for second in 0..60 {
            let condition = (second % 6 < 3 && second < 40).then_some(0);
            transitions.extend(lifecycle.update(condition, second * S, 10 * S));
        }
        assert_eq!(transitions.len(), 2, "{transitions:?}");
        assert_eq!(
            transitions[1],
            Transition::Resolved {
                started_ns: 0,
                ended_ns: 39 * S
            }
        );
    }
}
