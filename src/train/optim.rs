//! AdamW with savable state, learning-rate schedules, global-norm gradient clipping.
//! (contract stub; see the helper brief)
