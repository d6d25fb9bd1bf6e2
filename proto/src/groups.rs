//! Rules about a [`RolloutGroup`] that the coordinator and the learners must agree on. Today
//! there is one: when a group is *tied*.
//!
//! A group is tied when its rewards' unbiased standard deviation is at most [`TIED_STD_ATOL`]
//! (TRL's `torch.isclose(std, 0)`; a single completion counts as tied). A tied group has zero
//! group-relative advantages, so it carries no learning signal. The coordinator counts tied groups
//! as they arrive and, under `grpo.filter_tied_groups`, consumes them without training; the
//! learners count the tied groups among those they train. Both call [`RolloutGroup::is_tied`].

use crate::v1::RolloutGroup;

/// The largest reward standard deviation that still counts as a tie (TRL's `isclose` atol).
pub const TIED_STD_ATOL: f64 = 1e-8;

/// True when the rewards tie (unbiased std <= [`TIED_STD_ATOL`], or fewer than two rewards).
pub fn rewards_tie(rewards: &[f64]) -> bool {
    if rewards.len() < 2 {
        return true;
    }
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0);
    var.sqrt() <= TIED_STD_ATOL
}

impl RolloutGroup {
    /// True when all rewards of the group tie ([`rewards_tie`]).
    pub fn is_tied(&self) -> bool {
        let rewards: Vec<f64> = self.completions.iter().map(|c| f64::from(c.reward)).collect();
        rewards_tie(&rewards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::Completion;

    fn group(rewards: &[f32]) -> RolloutGroup {
        RolloutGroup {
            completions: rewards.iter().map(|&reward| Completion { reward, ..Default::default() }).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn equal_rewards_tie_and_distinct_ones_do_not() {
        assert!(group(&[0.5, 0.5, 0.5]).is_tied());
        assert!(!group(&[0.5, 0.5, 0.6]).is_tied());
        assert!(group(&[1.0]).is_tied(), "one completion has no spread");
    }

    #[test]
    fn the_tie_tolerance_is_an_absolute_std_of_1e_8() {
        // std of [x, x + d] is d / sqrt(2): a tie up to d = sqrt(2) * 1e-8.
        assert!(rewards_tie(&[0.25, 0.25 + 1.0e-8]));
        assert!(!rewards_tie(&[0.25, 0.25 + 2.0e-8]));
    }
}
