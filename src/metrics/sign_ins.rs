//! Sign-in counters: `mailintegration_sign_ins_total{result,reason}`, fed by the sign-in server
//! (`web::signin::counting`) with every outcome it reports on an integration.

use super::{Metrics, RefreshLabels};
use crate::reason::Reason;

impl Metrics {
    /// Count a sign-in's outcome: [`Reason::SignedIn`] a success, any other reason a failure.
    pub fn count_sign_in(&self, reason: Reason) {
        let result = if reason == Reason::SignedIn {
            "success"
        } else {
            "failure"
        };
        let labels = RefreshLabels {
            result: result.into(),
            reason: reason.as_str().into(),
        };
        self.sign_ins.get_or_create(&labels).inc();
    }
}
