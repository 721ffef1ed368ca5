//! Identifiers. Dense indexes (`SiteIdx`, `DeviceIdx`, ...) address arrays in the resolved fleet;
//! names (strings from the fleet file) are what users see and what the API takes.

use std::fmt;

macro_rules! dense_id {
    ($(#[$doc:meta])* $name:ident, $int:ty) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $int);
        impl $name {
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

dense_id!(
    /// Index of a site in [`crate::fleet::Fleet::sites`].
    SiteIdx, u16
);
dense_id!(
    /// Index of a feeder/PDU in [`crate::fleet::Fleet::feeders`].
    FeederIdx, u32
);
dense_id!(
    /// Index of a rack in [`crate::fleet::Fleet::racks`].
    RackIdx, u32
);
dense_id!(
    /// Index of a device in [`crate::fleet::Fleet::devices`]; stable for a given fleet file.
    DeviceIdx, u32
);
dense_id!(
    /// Index of an ASIC model in [`crate::device::Catalogue::asics`].
    AsicModelIdx, u16
);
dense_id!(
    /// Index of a GPU model in [`crate::device::Catalogue::gpus`].
    GpuModelIdx, u16
);
dense_id!(
    /// A tenant (an AI customer).
    TenantId, u32
);
