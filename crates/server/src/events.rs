//! Typed payloads of bus subjects, one type per subject, used by the producer and every consumer.
//! (Subjects announced before this module existed still carry `json!` payloads; they move here as
//! they are touched.)

use serde::{Deserialize, Serialize};

/// `hcp.policy`: a policy saved through the API (the body as stored, validated there).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyNotice {
    pub name: String,
    pub version: i64,
    pub body: String,
}

/// `hcp.alert`: the engine's alerts as they are raised and cleared.
pub type AlertNotice = hcp_engine::io::Alert;
