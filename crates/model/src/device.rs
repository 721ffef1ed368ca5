//! Device models: the ASIC table and the H100 SXM/PCIe from `shared/reference/economics.md`, plus
//! models added by a fleet file. Every figure here is a default a fleet file can override.

use serde::{Deserialize, Serialize};

use crate::ids::{AsicModelIdx, GpuModelIdx};

/// How a miner is cooled; sets which temperature its derating limits refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cooling {
    Air,
    Hydro,
}

/// A Bitcoin-mining ASIC model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsicModel {
    pub id: String,
    pub name: String,
    /// Nameplate hashrate at `power_w`.
    pub hashrate_ths: f64,
    /// Nameplate power.
    pub power_w: f64,
    /// Lowest power target the firmware holds (LuxOS S21 example: 2,800 of 3,500 W).
    pub min_power_w: f64,
    /// Highest power target (nameplate unless overclocking is allowed).
    pub max_power_w: f64,
    /// Hashrate scales as (power / nameplate power)^exponent; < 1 makes J/TH improve when
    /// underclocked (the curve is concave).
    pub curve_exponent: f64,
    /// Draw while asleep (hash boards off, controller and fans on).
    pub sleep_power_w: f64,
    /// Draw while booting or waking (controller, fans, board initialisation).
    pub boot_power_w: f64,
    /// From sleep to hashing.
    pub wake_s: f64,
    /// From power-on to hashing.
    pub cold_start_s: f64,
    /// Number of hash boards; losing one costs 1/n of hashrate and power.
    pub hash_boards: u8,
    pub cooling: Cooling,
    /// J/TH rises by this fraction per degree C of ambient above `efficiency_ref_c`.
    pub jth_rise_per_c: f64,
    pub efficiency_ref_c: f64,
    /// Above this ambient the firmware lowers the highest power target, reaching the minimum at
    /// `shutdown_c`.
    pub derate_c: f64,
    /// At or above this ambient the miner shuts its hash boards down.
    pub shutdown_c: f64,
}

impl AsicModel {
    /// Nameplate efficiency in J/TH.
    pub fn j_per_th(&self) -> f64 {
        self.power_w / self.hashrate_ths
    }

    fn builtin(id: &str, name: &str, ths: f64, w: f64, cooling: Cooling) -> Self {
        let (derate_c, shutdown_c) = match cooling {
            Cooling::Air => (40.0, 47.0),
            Cooling::Hydro => (45.0, 55.0),
        };
        AsicModel {
            id: id.into(),
            name: name.into(),
            hashrate_ths: ths,
            power_w: w,
            min_power_w: (0.8 * w).round(),
            max_power_w: w,
            curve_exponent: 0.6,
            sleep_power_w: 25.0,
            boot_power_w: (0.12 * w).round(),
            wake_s: 60.0,
            cold_start_s: 300.0,
            hash_boards: 3,
            cooling,
            jth_rise_per_c: 0.004,
            efficiency_ref_c: 25.0,
            derate_c,
            shutdown_c,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let e = |f: &str, r: &str| Err((f.to_string(), r.to_string()));
        if self.id.is_empty() {
            return e("id", "must not be empty");
        }
        for (f, v) in [
            ("hashrate_ths", self.hashrate_ths),
            ("power_w", self.power_w),
            ("min_power_w", self.min_power_w),
            ("max_power_w", self.max_power_w),
            ("curve_exponent", self.curve_exponent),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return e(f, "must be a finite number > 0");
            }
        }
        for (f, v) in [
            ("sleep_power_w", self.sleep_power_w),
            ("boot_power_w", self.boot_power_w),
            ("wake_s", self.wake_s),
            ("cold_start_s", self.cold_start_s),
            ("jth_rise_per_c", self.jth_rise_per_c),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return e(f, "must be a finite number >= 0");
            }
        }
        if self.min_power_w > self.max_power_w {
            return e("min_power_w", "must be <= max_power_w");
        }
        if self.curve_exponent > 1.0 {
            return e("curve_exponent", "must be <= 1 (hashrate concave in power)");
        }
        if self.sleep_power_w >= self.min_power_w {
            return e("sleep_power_w", "must be below min_power_w");
        }
        if self.hash_boards == 0 {
            return e("hash_boards", "must be >= 1");
        }
        if self.derate_c >= self.shutdown_c {
            return e("derate_c", "must be below shutdown_c");
        }
        Ok(())
    }
}

/// Form factor of an H100-class GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuForm {
    Sxm,
    Pcie,
}

/// An inference GPU model (H100 SXM and PCIe built in).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuModel {
    pub id: String,
    pub name: String,
    pub form: GpuForm,
    /// Board power limit (highest settable cap).
    pub max_power_w: f64,
    /// Lowest settable power cap.
    pub min_cap_w: f64,
    /// Board draw idle with no model loaded.
    pub idle_w: f64,
    /// Board draw idle with a model loaded in memory.
    pub loaded_w: f64,
    /// Dynamic board power (above `loaded_w`) when busy at batch 1 and full clocks.
    pub dynamic_batch1_w: f64,
    /// Batch size scale over which dynamic power rises from batch-1 level to the board limit.
    pub dynamic_batch_scale: f64,
    pub memory_gb: f64,
    pub memory_bandwidth_tb_s: f64,
    pub bf16_tflops: f64,
    /// Host share per GPU (CPUs, NICs, fans) at idle and extra at full load; the DGX H100's
    /// 10.2 kW for 8 GPUs is 1,275 W per GPU all-in.
    pub host_idle_w: f64,
    pub host_load_w: f64,
    /// GPU temperature rise per watt of board power over the inlet air.
    pub thermal_c_per_w: f64,
    /// Clocks throttle above this GPU temperature.
    pub throttle_c: f64,
}

impl GpuModel {
    fn h100(form: GpuForm) -> Self {
        let sxm = form == GpuForm::Sxm;
        GpuModel {
            id: if sxm { "h100-sxm" } else { "h100-pcie" }.into(),
            name: if sxm { "NVIDIA H100 SXM5 80GB" } else { "NVIDIA H100 PCIe 80GB" }.into(),
            form,
            max_power_w: if sxm { 700.0 } else { 350.0 },
            min_cap_w: 200.0,
            idle_w: 72.0,
            loaded_w: 115.0,
            // 115 W + 0.92 x 337 W = 425 W: the measured Llama-3-8B point at 92 % utilisation.
            dynamic_batch1_w: 337.0,
            dynamic_batch_scale: 32.0,
            memory_gb: 80.0,
            memory_bandwidth_tb_s: if sxm { 3.35 } else { 2.0 },
            bf16_tflops: if sxm { 989.0 } else { 756.0 },
            host_idle_w: if sxm { 150.0 } else { 100.0 },
            host_load_w: if sxm { 425.0 } else { 200.0 },
            thermal_c_per_w: if sxm { 0.075 } else { 0.13 },
            throttle_c: 87.0,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let e = |f: &str, r: &str| Err((f.to_string(), r.to_string()));
        if self.id.is_empty() {
            return e("id", "must not be empty");
        }
        for (f, v) in [
            ("max_power_w", self.max_power_w),
            ("min_cap_w", self.min_cap_w),
            ("idle_w", self.idle_w),
            ("loaded_w", self.loaded_w),
            ("dynamic_batch1_w", self.dynamic_batch1_w),
            ("dynamic_batch_scale", self.dynamic_batch_scale),
            ("memory_gb", self.memory_gb),
            ("memory_bandwidth_tb_s", self.memory_bandwidth_tb_s),
            ("bf16_tflops", self.bf16_tflops),
            ("thermal_c_per_w", self.thermal_c_per_w),
            ("throttle_c", self.throttle_c),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return e(f, "must be a finite number > 0");
            }
        }
        for (f, v) in [("host_idle_w", self.host_idle_w), ("host_load_w", self.host_load_w)] {
            if !(v.is_finite() && v >= 0.0) {
                return e(f, "must be a finite number >= 0");
            }
        }
        if self.min_cap_w > self.max_power_w {
            return e("min_cap_w", "must be <= max_power_w");
        }
        if self.idle_w > self.loaded_w || self.loaded_w >= self.min_cap_w {
            return e("loaded_w", "must satisfy idle_w <= loaded_w < min_cap_w");
        }
        Ok(())
    }
}

/// An LLM served on the GPUs, for prefill/decode timing and memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedModel {
    pub id: String,
    /// Parameters in billions.
    pub params_b: f64,
    /// 2 for BF16/FP16 weights, 1 for FP8.
    pub bytes_per_param: f64,
    /// KV-cache bytes per token of context (Llama-3-8B: 2 x 32 layers x 8 KV heads x 128 x 2 B).
    pub kv_bytes_per_token: f64,
    /// GPUs one replica spans (tensor parallel).
    pub gpus_per_replica: u32,
    /// Longest context (prompt and output tokens) a request may have.
    #[serde(default = "default_context_tokens")]
    pub context_tokens: u32,
}

fn default_context_tokens() -> u32 {
    8_192
}

impl ServedModel {
    pub fn llama3_8b() -> Self {
        ServedModel {
            id: "llama-3-8b".into(),
            params_b: 8.03,
            bytes_per_param: 2.0,
            kv_bytes_per_token: 131_072.0,
            gpus_per_replica: 1,
            context_tokens: 8_192,
        }
    }

    pub fn weight_bytes(&self) -> f64 {
        self.params_b * 1e9 * self.bytes_per_param
    }
}

/// All device models known to a fleet: built-ins first, then the fleet file's additions.
#[derive(Clone, Debug, PartialEq)]
pub struct Catalogue {
    pub asics: Vec<AsicModel>,
    pub gpus: Vec<GpuModel>,
}

/// What a model id refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModelRef {
    Asic(AsicModelIdx),
    Gpu(GpuModelIdx),
}

impl Default for Catalogue {
    fn default() -> Self {
        use Cooling::*;
        Catalogue {
            asics: vec![
                AsicModel::builtin("antminer-s19-xp", "Antminer S19 XP", 140.0, 3010.0, Air),
                AsicModel::builtin("antminer-s21", "Antminer S21", 200.0, 3500.0, Air),
                AsicModel::builtin("antminer-s21-pro", "Antminer S21 Pro", 234.0, 3510.0, Air),
                AsicModel::builtin("antminer-s21-xp", "Antminer S21 XP", 270.0, 3645.0, Air),
                AsicModel::builtin("antminer-s21-plus-hydro", "Antminer S21+ Hydro", 319.0, 4785.0, Hydro),
                AsicModel::builtin("whatsminer-m66s-plus", "Whatsminer M66S+", 314.0, 5338.0, Hydro),
                AsicModel::builtin("whatsminer-m60s", "Whatsminer M60S", 186.0, 3425.0, Air),
            ],
            gpus: vec![GpuModel::h100(GpuForm::Sxm), GpuModel::h100(GpuForm::Pcie)],
        }
    }
}

impl Catalogue {
    pub fn lookup(&self, id: &str) -> Option<ModelRef> {
        if let Some(i) = self.asics.iter().position(|m| m.id == id) {
            return Some(ModelRef::Asic(AsicModelIdx(i as u16)));
        }
        self.gpus.iter().position(|m| m.id == id).map(|i| ModelRef::Gpu(GpuModelIdx(i as u16)))
    }

    pub fn asic(&self, i: AsicModelIdx) -> &AsicModel {
        &self.asics[i.index()]
    }

    pub fn gpu(&self, i: GpuModelIdx) -> &GpuModel {
        &self.gpus[i.index()]
    }

    /// All ids, for error messages.
    pub fn ids(&self) -> Vec<&str> {
        self.asics.iter().map(|m| m.id.as_str()).chain(self.gpus.iter().map(|m| m.id.as_str())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_matches_economics_reference() {
        let c = Catalogue::default();
        let check = |id: &str, ths: f64, w: f64, jth: f64| {
            let Some(ModelRef::Asic(i)) = c.lookup(id) else { panic!("{id} missing") };
            let m = c.asic(i);
            assert_eq!((m.hashrate_ths, m.power_w), (ths, w), "{id}");
            assert!((m.j_per_th() - jth).abs() < 0.06, "{id}: {} J/TH", m.j_per_th());
            m.validate().unwrap();
        };
        check("antminer-s19-xp", 140.0, 3010.0, 21.5);
        check("antminer-s21", 200.0, 3500.0, 17.5);
        check("antminer-s21-pro", 234.0, 3510.0, 15.0);
        check("antminer-s21-xp", 270.0, 3645.0, 13.5);
        check("antminer-s21-plus-hydro", 319.0, 4785.0, 15.0);
        check("whatsminer-m66s-plus", 314.0, 5338.0, 17.0);
        check("whatsminer-m60s", 186.0, 3425.0, 18.4);
        for g in &c.gpus {
            g.validate().unwrap();
        }
        assert_eq!(c.gpus[0].max_power_w, 700.0);
        assert_eq!(c.gpus[1].max_power_w, 350.0);
    }
}
