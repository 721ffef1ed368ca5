//! The states of work as stored and announced: a batch job's life, a usage record's kind and how
//! its work ended. Each is an enum with one text form (snake_case) used in storage, JSON and
//! the API; text that is none of them is refused, naming the field.

use std::fmt;
use std::str::FromStr;

use crate::Invalid;

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident, $field:literal { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vm])* $v),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Invalid;
            fn from_str(s: &str) -> Result<Self, Invalid> {
                $name::ALL.iter().copied().find(|x| x.as_str() == s).ok_or_else(|| {
                    let all: Vec<&str> = $name::ALL.iter().map(|x| x.as_str()).collect();
                    Invalid::new($field, format!("must be one of {}, not {s:?}", all.join(", ")))
                })
            }
        }
    };
}

text_enum!(
    /// A batch job's state.
    JobState, "state" {
        /// Waiting for the planner (it has a deadline, and cheaper power may come before it).
        Deferred => "deferred",
        /// Waiting for the router's placement.
        Queued => "queued",
        Running => "running",
        Completed => "completed",
        Cancelled => "cancelled",
        Rejected => "rejected",
        Failed => "failed",
    }
);

impl JobState {
    /// Ended: nothing more happens to the job.
    pub fn ended(self) -> bool {
        matches!(self, JobState::Completed | JobState::Cancelled | JobState::Rejected | JobState::Failed)
    }
}

text_enum!(
    /// What a usage record meters.
    UsageKind, "kind" {
        /// Inference requests: input and output tokens.
        Tokens => "tokens",
        /// Batch jobs: GPU-milliseconds.
        Gpu => "gpu",
    }
);

text_enum!(
    /// How the metered work ended.
    UsageStatus, "status" {
        Completed => "completed",
        /// The client went away or cancelled.
        Cancelled => "cancelled",
        /// The backend failed after the first byte (or the job failed).
        Failed => "failed",
        /// Its replica left service.
        Preempted => "preempted",
        /// The router refused the job after it ran (metered for the time it ran).
        Rejected => "rejected",
    }
);

impl From<JobState> for UsageStatus {
    /// The usage status of a job that ended in `s` (a job still going is metered as failed).
    fn from(s: JobState) -> Self {
        match s {
            JobState::Completed => UsageStatus::Completed,
            JobState::Cancelled => UsageStatus::Cancelled,
            JobState::Rejected => UsageStatus::Rejected,
            JobState::Failed | JobState::Deferred | JobState::Queued | JobState::Running => UsageStatus::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_state_reads_back_from_its_text_and_other_text_is_refused() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), *s);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
        for s in UsageStatus::ALL {
            assert_eq!(s.as_str().parse::<UsageStatus>().unwrap(), *s);
        }
        let e = "paused".parse::<JobState>().unwrap_err();
        assert_eq!(e.field, "state");
        assert!(e.rule.contains("deferred, queued, running"), "{e}");
        assert_eq!("token".parse::<UsageKind>().unwrap_err().field, "kind");
    }
}
