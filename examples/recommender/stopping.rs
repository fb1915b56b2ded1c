//! Early stopping: training ends when the validation NDCG@10 has not
//! improved for `patience` epochs, and the tables of the best epoch are the
//! ones kept. The epoch count then follows the data: a 100K-rating file
//! trains for more epochs than a large one, whose epochs each see more.

/// The best validation score so far and when it was reached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EarlyStop {
    /// Epochs without a better validation score before training stops
    /// (0: never stop early, keep the last epoch's tables).
    pub patience: u64,
    /// The epoch (1-based) of the best score, 0 before any.
    pub best_epoch: u64,
    /// The best validation NDCG@10 (−∞ before any).
    pub best: f64,
}

impl EarlyStop {
    /// Nothing observed yet.
    pub fn new(patience: u64) -> Self {
        EarlyStop {
            patience,
            best_epoch: 0,
            best: f64::NEG_INFINITY,
        }
    }

    /// Records the validation score of `epoch`; `true` if it is strictly
    /// better than every earlier one (a NaN never is).
    pub fn observe(&mut self, epoch: u64, score: f64) -> bool {
        let better = score > self.best;
        if better {
            self.best = score;
            self.best_epoch = epoch;
        }
        better
    }

    /// Whether training stops after `epoch`: `patience` epochs have passed
    /// since the best one.
    pub fn should_stop(&self, epoch: u64) -> bool {
        self.patience > 0 && self.best_epoch > 0 && epoch >= self.best_epoch + self.patience
    }

    /// Whether the tables of the best epoch replace the last ones at the end.
    pub fn keeps_best(&self) -> bool {
        self.patience > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_epochs_without_a_better_score() {
        let mut stop = EarlyStop::new(2);
        let scores = [0.10, 0.12, 0.11, 0.12, 0.13, 0.125, 0.13, 0.12];
        let mut stopped_after = None;
        for (e, &s) in scores.iter().enumerate() {
            let epoch = e as u64 + 1;
            stop.observe(epoch, s);
            if stop.should_stop(epoch) {
                stopped_after = Some(epoch);
                break;
            }
        }
        // Best 0.12 at epoch 2; epochs 3 and 4 are no better (a tie is not
        // better): stop after epoch 4, before the better epoch 5.
        assert_eq!(stopped_after, Some(4));
        assert_eq!((stop.best_epoch, stop.best), (2, 0.12));
    }

    #[test]
    fn a_better_score_restarts_the_wait() {
        let mut stop = EarlyStop::new(3);
        assert!(!stop.should_stop(0), "nothing observed: no reason to stop");
        assert!(stop.observe(1, 0.1));
        assert!(!stop.observe(2, 0.1), "a tie is not better");
        assert!(!stop.observe(3, f64::NAN));
        assert!(!stop.should_stop(3));
        assert!(stop.should_stop(4));
        assert!(stop.observe(4, 0.2));
        assert!(!stop.should_stop(6) && stop.should_stop(7));
        assert!(stop.keeps_best());
    }

    #[test]
    fn patience_zero_never_stops() {
        let mut stop = EarlyStop::new(0);
        stop.observe(1, 0.5);
        for epoch in 1..100 {
            stop.observe(epoch + 1, 0.1);
            assert!(!stop.should_stop(epoch + 1));
        }
        assert_eq!(stop.best_epoch, 1, "the best is still tracked");
        assert!(!stop.keeps_best());
    }
}
