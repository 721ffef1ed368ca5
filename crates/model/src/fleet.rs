//! The fleet file (TOML) and the resolved fleet.
//!
//! A fleet file describes sites (power cap, grid settlement point), their feeders/PDUs (each with
//! its own limit), racks and device counts by model, optional extra or overridden device models and
//! reliability rates. [`Fleet::from_toml`] validates it once into a resolved [`Fleet`]; every error
//! names the file, the field (as a path such as `site[1].feeder[0].limit_kw`) and the rule.

use std::fmt;

use serde::Deserialize;

use crate::device::{AsicModel, Catalogue, GpuModel, ModelRef, ServedModel};
use crate::ids::{FeederIdx, RackIdx, SiteIdx};

/// Limits on what a fleet file may describe.
pub const MAX_SITES: usize = 1_000;
pub const MAX_DEVICES: usize = 5_000_000;
pub const MAX_RACKS: usize = 500_000;

/// A fleet file error: which file, which field, which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FleetError {
    pub file: String,
    /// Path of the offending field, e.g. `site[0].feeder[2].limit_kw`, or `line:column` for syntax.
    pub field: String,
    pub rule: String,
}

impl fmt::Display for FleetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.field, self.rule)
    }
}

/// Fault rates and repair times of the simulated (and expected real) hardware.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reliability {
    /// Spontaneous reboots per ASIC per day, and how long one takes to hash again.
    pub asic_reboots_per_day: f64,
    pub asic_reboot_s: f64,
    /// Hash-board losses per ASIC per day, and the mean time until the board is replaced.
    pub asic_board_failures_per_day: f64,
    pub asic_board_repair_h: f64,
    /// Fan failures per ASIC per day (the miner protects itself by stopping) and mean repair time.
    pub asic_fan_failures_per_day: f64,
    pub asic_fan_repair_h: f64,
    /// Xid-style errors per GPU per day (mixed severities).
    pub gpu_xid_per_day: f64,
}

impl Default for Reliability {
    fn default() -> Self {
        Reliability {
            asic_reboots_per_day: 0.02,
            asic_reboot_s: 240.0,
            asic_board_failures_per_day: 0.001,
            asic_board_repair_h: 72.0,
            asic_fan_failures_per_day: 0.0005,
            asic_fan_repair_h: 24.0,
            gpu_xid_per_day: 0.003,
        }
    }
}

impl Reliability {
    fn validate(&self) -> Result<(), (String, String)> {
        for (f, v) in [
            ("asic_reboots_per_day", self.asic_reboots_per_day),
            ("asic_reboot_s", self.asic_reboot_s),
            ("asic_board_failures_per_day", self.asic_board_failures_per_day),
            ("asic_board_repair_h", self.asic_board_repair_h),
            ("asic_fan_failures_per_day", self.asic_fan_failures_per_day),
            ("asic_fan_repair_h", self.asic_fan_repair_h),
            ("gpu_xid_per_day", self.gpu_xid_per_day),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err((f.into(), "must be a finite number >= 0".into()));
            }
            if f.ends_with("_per_day") && v > 24.0 {
                return Err((f.into(), "must be <= 24 (at most one fault per hour)".into()));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    name: String,
    #[serde(default)]
    asic_model: Vec<toml::Table>,
    #[serde(default)]
    gpu_model: Vec<toml::Table>,
    served_model: Option<ServedModel>,
    #[serde(default)]
    reliability: Reliability,
    #[serde(default)]
    site: Vec<RawSite>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    id: String,
    power_cap_mw: f64,
    settlement_point: String,
    #[serde(default)]
    ambient_offset_c: f64,
    #[serde(default)]
    feeder: Vec<RawFeeder>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeeder {
    id: String,
    limit_kw: f64,
    #[serde(default)]
    rack: Vec<RawRack>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRack {
    /// Identical racks described once.
    #[serde(default = "one")]
    count: u32,
    devices: Vec<RawDeviceCount>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeviceCount {
    model: String,
    count: u32,
}

/// A site: one meter, one power cap, one grid settlement point.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    pub idx: SiteIdx,
    pub id: String,
    pub power_cap_w: f64,
    pub settlement_point: String,
    /// Added to the weather's air temperature at this site (altitude, hot aisle, climate).
    pub ambient_offset_c: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Feeder {
    pub idx: FeederIdx,
    pub site: SiteIdx,
    pub id: String,
    pub limit_w: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rack {
    pub idx: RackIdx,
    pub site: SiteIdx,
    pub feeder: FeederIdx,
    pub id: String,
}

/// One physical device. Its index in [`Fleet::devices`] is its [`crate::ids::DeviceIdx`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Device {
    pub site: SiteIdx,
    pub feeder: FeederIdx,
    pub rack: RackIdx,
    pub model: ModelRef,
}

/// A validated fleet: topology site -> feeder -> rack -> device, with its device catalogue.
#[derive(Clone, Debug, PartialEq)]
pub struct Fleet {
    pub name: String,
    pub catalogue: Catalogue,
    pub served_model: ServedModel,
    pub reliability: Reliability,
    pub sites: Vec<Site>,
    pub feeders: Vec<Feeder>,
    pub racks: Vec<Rack>,
    /// Ordered by site, feeder, rack, then the order of the file.
    pub devices: Vec<Device>,
}

/// The devices of one model on one feeder: the unit the simulators and the dispatcher group by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub site: SiteIdx,
    pub feeder: FeederIdx,
    pub model: ModelRef,
    /// Member devices in fleet order.
    pub devices: Vec<crate::ids::DeviceIdx>,
}

impl Group {
    pub fn count(&self) -> u32 {
        self.devices.len() as u32
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

fn merge_model<T: serde::de::DeserializeOwned + serde::Serialize>(
    base: Option<&T>,
    mut entry: toml::Table,
) -> Result<T, String> {
    entry.remove("base");
    let mut table = match base {
        Some(b) => toml::Table::try_from(b).map_err(|e| e.to_string())?,
        None => toml::Table::new(),
    };
    table.extend(entry);
    T::deserialize(toml::Value::Table(table)).map_err(|e| e.message().to_string())
}

fn fold_models<T, F>(
    file: &str,
    kind: &str,
    entries: Vec<toml::Table>,
    list: &mut Vec<T>,
    id_of: F,
    validate: fn(&T) -> Result<(), (String, String)>,
) -> Result<(), FleetError>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
    F: Fn(&T) -> &str,
{
    for (i, entry) in entries.into_iter().enumerate() {
        let at = |f: &str, rule: String| FleetError {
            file: file.into(),
            field: format!("{kind}[{i}]{}{f}", if f.is_empty() { "" } else { "." }),
            rule,
        };
        let id = entry.get("id").and_then(|v| v.as_str()).map(str::to_string);
        let base_id = match entry.get("base") {
            Some(v) => Some(v.as_str().ok_or_else(|| at("base", "must be a string".into()))?.to_string()),
            None => id.clone(),
        };
        let base_pos = base_id.as_deref().and_then(|b| list.iter().position(|m| id_of(m) == b));
        if let (Some(_), Some(b), None) = (entry.get("base"), base_id.as_deref(), base_pos) {
            return Err(at("base", format!("unknown model {b:?}")));
        }
        let model = merge_model(base_pos.map(|p| &list[p]), entry).map_err(|e| at("", e))?;
        validate(&model).map_err(|(f, r)| at(&f, r))?;
        match list.iter().position(|m| id_of(m) == id_of(&model)) {
            Some(p) => list[p] = model,
            None => list.push(model),
        }
    }
    Ok(())
}

impl Fleet {
    /// Parses and validates a fleet file's text. `file` is only used in error messages.
    pub fn from_toml(file: &str, src: &str) -> Result<Fleet, FleetError> {
        let raw: RawFleet = toml::from_str(src).map_err(|e| {
            let field = match e.span() {
                Some(s) => {
                    let (l, c) = line_col(src, s.start);
                    format!("line {l} column {c}")
                }
                None => "(document)".into(),
            };
            FleetError { file: file.into(), field, rule: e.message().to_string() }
        })?;
        let err = |field: String, rule: &str| FleetError { file: file.into(), field, rule: rule.into() };

        let mut catalogue = Catalogue::default();
        fold_models::<AsicModel, _>(
            file,
            "asic_model",
            raw.asic_model,
            &mut catalogue.asics,
            |m| &m.id,
            AsicModel::validate,
        )?;
        fold_models::<GpuModel, _>(
            file,
            "gpu_model",
            raw.gpu_model,
            &mut catalogue.gpus,
            |m| &m.id,
            GpuModel::validate,
        )?;
        raw.reliability.validate().map_err(|(f, r)| err(format!("reliability.{f}"), &r))?;
        let served_model = raw.served_model.unwrap_or_else(ServedModel::llama3_8b);
        if !(served_model.params_b > 0.0 && served_model.bytes_per_param > 0.0) {
            return Err(err("served_model.params_b".into(), "params_b and bytes_per_param must be > 0"));
        }
        if !(served_model.kv_bytes_per_token > 0.0 && served_model.gpus_per_replica >= 1) {
            return Err(err("served_model.kv_bytes_per_token".into(), "must be > 0 (and gpus_per_replica >= 1)"));
        }

        if raw.name.trim().is_empty() {
            return Err(err("name".into(), "must not be empty"));
        }
        if raw.site.is_empty() {
            return Err(err("site".into(), "a fleet needs at least one [[site]]"));
        }
        if raw.site.len() > MAX_SITES {
            return Err(err("site".into(), &format!("at most {MAX_SITES} sites")));
        }
        let mut fleet = Fleet {
            name: raw.name,
            catalogue,
            served_model,
            reliability: raw.reliability,
            sites: vec![],
            feeders: vec![],
            racks: vec![],
            devices: vec![],
        };
        for (si, s) in raw.site.into_iter().enumerate() {
            let sp = format!("site[{si}]");
            if s.id.trim().is_empty() {
                return Err(err(format!("{sp}.id"), "must not be empty"));
            }
            if fleet.sites.iter().any(|o| o.id == s.id) {
                return Err(err(format!("{sp}.id"), &format!("duplicate site id {:?}", s.id)));
            }
            if !(s.power_cap_mw.is_finite() && s.power_cap_mw > 0.0 && s.power_cap_mw <= 5_000.0) {
                return Err(err(format!("{sp}.power_cap_mw"), "must be a number > 0 and <= 5000"));
            }
            if s.settlement_point.trim().is_empty() {
                return Err(err(format!("{sp}.settlement_point"), "must not be empty"));
            }
            if !(s.ambient_offset_c.is_finite() && s.ambient_offset_c.abs() <= 30.0) {
                return Err(err(format!("{sp}.ambient_offset_c"), "must be between -30 and 30"));
            }
            if s.feeder.is_empty() {
                return Err(err(format!("{sp}.feeder"), "a site needs at least one [[site.feeder]]"));
            }
            let site_idx = SiteIdx(si as u16);
            fleet.sites.push(Site {
                idx: site_idx,
                id: s.id.clone(),
                power_cap_w: s.power_cap_mw * 1e6,
                settlement_point: s.settlement_point,
                ambient_offset_c: s.ambient_offset_c,
            });
            for (fi, f) in s.feeder.into_iter().enumerate() {
                let fp = format!("{sp}.feeder[{fi}]");
                if f.id.trim().is_empty() {
                    return Err(err(format!("{fp}.id"), "must not be empty"));
                }
                let site_feeders = fleet.feeders.iter().filter(|o| o.site == site_idx);
                if site_feeders.clone().any(|o| o.id == f.id) {
                    return Err(err(format!("{fp}.id"), &format!("duplicate feeder id {:?} in site {}", f.id, s.id)));
                }
                if !(f.limit_kw.is_finite() && f.limit_kw > 0.0) {
                    return Err(err(format!("{fp}.limit_kw"), "must be a number > 0"));
                }
                let feeder_idx = FeederIdx(fleet.feeders.len() as u32);
                fleet.feeders.push(Feeder {
                    idx: feeder_idx,
                    site: site_idx,
                    id: f.id.clone(),
                    limit_w: f.limit_kw * 1e3,
                });
                let mut feeder_min_w = 0.0;
                let mut rack_no = 0;
                for (ri, r) in f.rack.into_iter().enumerate() {
                    let rp = format!("{fp}.rack[{ri}]");
                    if r.count == 0 {
                        return Err(err(format!("{rp}.count"), "must be >= 1"));
                    }
                    if r.devices.is_empty() {
                        return Err(err(format!("{rp}.devices"), "a rack needs at least one device entry"));
                    }
                    let mut models = Vec::with_capacity(r.devices.len());
                    for (di, d) in r.devices.iter().enumerate() {
                        let dp = format!("{rp}.devices[{di}]");
                        let m = fleet.catalogue.lookup(&d.model).ok_or_else(|| {
                            err(
                                format!("{dp}.model"),
                                &format!("unknown model {:?}; known: {}", d.model, fleet.catalogue.ids().join(", ")),
                            )
                        })?;
                        if d.count == 0 || d.count > 10_000 {
                            return Err(err(format!("{dp}.count"), "must be between 1 and 10000 per rack"));
                        }
                        feeder_min_w += f64::from(d.count)
                            * f64::from(r.count)
                            * match m {
                                ModelRef::Asic(a) => fleet.catalogue.asic(a).min_power_w,
                                ModelRef::Gpu(g) => fleet.catalogue.gpu(g).loaded_w,
                            };
                        models.push((m, d.count));
                    }
                    let per_rack: usize = models.iter().map(|(_, c)| *c as usize).sum();
                    if fleet.devices.len() + per_rack * r.count as usize > MAX_DEVICES {
                        return Err(err(
                            format!("{rp}.count"),
                            &format!("the fleet may hold at most {MAX_DEVICES} devices"),
                        ));
                    }
                    if fleet.racks.len() + r.count as usize > MAX_RACKS {
                        return Err(err(
                            format!("{rp}.count"),
                            &format!("the fleet may hold at most {MAX_RACKS} racks"),
                        ));
                    }
                    for _ in 0..r.count {
                        rack_no += 1;
                        let rack_idx = RackIdx(fleet.racks.len() as u32);
                        fleet.racks.push(Rack {
                            idx: rack_idx,
                            site: site_idx,
                            feeder: feeder_idx,
                            id: format!("{}/{}/r{rack_no}", s.id, f.id),
                        });
                        for &(model, count) in &models {
                            fleet.devices.extend(std::iter::repeat_n(
                                Device { site: site_idx, feeder: feeder_idx, rack: rack_idx, model },
                                count as usize,
                            ));
                        }
                    }
                }
                if feeder_min_w > f.limit_kw * 1e3 {
                    return Err(err(
                        format!("{fp}.limit_kw"),
                        &format!(
                            "{} kW is below the {:.0} kW its devices draw at their lowest running power",
                            f.limit_kw,
                            feeder_min_w / 1e3
                        ),
                    ));
                }
            }
        }
        if fleet.devices.is_empty() {
            return Err(err("site".into(), "the fleet has no devices"));
        }
        Ok(fleet)
    }

    /// Devices by (feeder, model), sorted by feeder (hence site) then model, ASICs before GPUs.
    pub fn groups(&self) -> Vec<Group> {
        let mut map = std::collections::BTreeMap::<(u32, u8, u16), Group>::new();
        for (i, d) in self.devices.iter().enumerate() {
            let key = match d.model {
                ModelRef::Asic(a) => (d.feeder.0, 0, a.0),
                ModelRef::Gpu(g) => (d.feeder.0, 1, g.0),
            };
            map.entry(key)
                .or_insert_with(|| Group { site: d.site, feeder: d.feeder, model: d.model, devices: vec![] })
                .devices
                .push(crate::ids::DeviceIdx(i as u32));
        }
        map.into_values().collect()
    }

    /// Draw of each site's ASICs when all are asleep, by site.
    pub fn asic_sleep_w_by_site(&self) -> Vec<f64> {
        let mut w = vec![0.0; self.sites.len()];
        for d in &self.devices {
            if let ModelRef::Asic(a) = d.model {
                w[d.site.index()] += self.catalogue.asic(a).sleep_power_w;
            }
        }
        w
    }

    pub fn asic_count(&self) -> usize {
        self.devices.iter().filter(|d| matches!(d.model, ModelRef::Asic(_))).count()
    }

    pub fn gpu_count(&self) -> usize {
        self.devices.len() - self.asic_count()
    }

    pub fn model_id(&self, m: ModelRef) -> &str {
        match m {
            ModelRef::Asic(a) => &self.catalogue.asic(a).id,
            ModelRef::Gpu(g) => &self.catalogue.gpu(g).id,
        }
    }

    /// Power the site's devices draw at nameplate (ASICs at nameplate, GPUs at their board limit
    /// plus host share at full load).
    pub fn site_nameplate_w(&self, site: SiteIdx) -> f64 {
        self.devices
            .iter()
            .filter(|d| d.site == site)
            .map(|d| match d.model {
                ModelRef::Asic(a) => self.catalogue.asic(a).power_w,
                ModelRef::Gpu(m) => {
                    let m = self.catalogue.gpu(m);
                    m.max_power_w + m.host_idle_w + m.host_load_w
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> Fleet {
        let path = format!("{}/../../examples/fleets/{name}", env!("CARGO_MANIFEST_DIR"));
        let src = std::fs::read_to_string(&path).unwrap();
        Fleet::from_toml(&path, &src).unwrap()
    }

    #[test]
    fn example_fleets_load_with_the_promised_sizes() {
        let small = example("small.toml");
        assert_eq!(small.sites.len(), 2);
        assert!((200..=500).contains(&small.devices.len()), "{}", small.devices.len());
        let r = example("reference.toml");
        assert_eq!((r.sites.len(), r.asic_count(), r.gpu_count()), (10, 250_000, 50_000));
        let models: std::collections::BTreeSet<_> = r.groups().iter().map(|g| g.model).collect();
        assert!(models.len() >= 7, "mixed models");
        // Groups partition the devices.
        assert_eq!(r.groups().iter().map(|g| g.devices.len()).sum::<usize>(), r.devices.len());
    }

    const OK: &str = r#"
name = "t"
[[site]]
id = "a"
power_cap_mw = 1.0
settlement_point = "HB_SOUTH"
  [[site.feeder]]
  id = "f"
  limit_kw = 500
    [[site.feeder.rack]]
    count = 2
    devices = [{ model = "antminer-s21", count = 10 }, { model = "h100-sxm", count = 8 }]
"#;

    fn check(src: &str, field: &str, rule: &str) {
        let e = Fleet::from_toml("f.toml", src).unwrap_err();
        assert_eq!((e.file.as_str(), e.field.as_str()), ("f.toml", field), "{e}");
        assert!(e.rule.contains(rule), "{e}");
    }

    #[test]
    fn a_valid_file_resolves_topology() {
        let f = Fleet::from_toml("f.toml", OK).unwrap();
        assert_eq!((f.racks.len(), f.devices.len(), f.racks[1].id.as_str()), (2, 36, "a/f/r2"));
        assert_eq!(f.groups().len(), 2);
        assert_eq!(f.sites[0].power_cap_w, 1e6);
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_rule() {
        check(&OK.replace("power_cap_mw = 1.0", "power_cap_mw = -1"), "site[0].power_cap_mw", "> 0");
        check(&OK.replace("limit_kw = 500", "limit_kw = 50"), "site[0].feeder[0].limit_kw", "lowest running power");
        check(
            &OK.replace("\"antminer-s21\"", "\"antminer-s99\""),
            "site[0].feeder[0].rack[0].devices[0].model",
            "unknown model",
        );
        check(&OK.replace("count = 2", "count = 0"), "site[0].feeder[0].rack[0].count", ">= 1");
        check(
            &OK.replace("settlement_point = \"HB_SOUTH\"", "settlement_point = \"\""),
            "site[0].settlement_point",
            "empty",
        );
        check(&OK.replace("id = \"a\"", "id = \"a\"\ncolour = 3"), "line 5 column 1", "unknown field");
        check(&OK.replace("power_cap_mw = 1.0", "power_cap_mw = \"big\""), "line 5 column 16", "invalid type");
        check(&format!("{OK}\n[reliability]\nasic_reboots_per_day = -1\n"), "reliability.asic_reboots_per_day", ">= 0");
        check(
            &format!("{OK}{}", OK.split("[[site]]").nth(1).map(|s| format!("[[site]]{s}")).unwrap()),
            "site[1].id",
            "duplicate",
        );
        check("name = \"x\"\n", "site", "at least one");
    }

    #[test]
    fn models_are_extensible_and_overridable() {
        let extra = r#"
[[asic_model]]
base = "antminer-s21"
id = "s21-tuned"
name = "S21 tuned"
min_power_w = 2000
[[asic_model]]
id = "antminer-s19-xp"
hashrate_ths = 130
"#;
        let src = OK
            .replace("name = \"t\"", &format!("name = \"t\"\n{extra}"))
            .replace("\"antminer-s21\", count = 10", "\"s21-tuned\", count = 10");
        let f = Fleet::from_toml("f.toml", &src).unwrap();
        let Some(ModelRef::Asic(i)) = f.catalogue.lookup("s21-tuned") else { panic!() };
        assert_eq!((f.catalogue.asic(i).min_power_w, f.catalogue.asic(i).power_w), (2000.0, 3500.0));
        let Some(ModelRef::Asic(j)) = f.catalogue.lookup("antminer-s19-xp") else { panic!() };
        assert_eq!(f.catalogue.asic(j).hashrate_ths, 130.0);
        let bad = OK.replace(
            "name = \"t\"",
            "name = \"t\"\n[[asic_model]]\nbase = \"antminer-s21\"\nid = \"x\"\nmin_power_w = 9000\n",
        );
        check(&bad, "asic_model[0].min_power_w", "<= max_power_w");
        let bad = OK.replace("name = \"t\"", "name = \"t\"\n[[asic_model]]\nbase = \"nope\"\nid = \"x\"\n");
        check(&bad, "asic_model[0].base", "unknown model");
        let bad = OK.replace("name = \"t\"", "name = \"t\"\n[[asic_model]]\nid = \"new\"\n");
        check(&bad, "asic_model[0]", "missing field");
    }
}
