//! Seeded random streams. Every simulator draws from its own stream, derived from the run's seed
//! and a stream name, so that adding draws to one simulator never shifts another's.

use rand::SeedableRng;
pub use rand_pcg::Pcg64Mcg as Rng;

/// SplitMix64 finaliser: a good 64-bit mix for deriving seeds.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream for `name` (and a sub-index, such as a site) under `seed`.
pub fn stream(seed: u64, name: &str, index: u64) -> Rng {
    let mut h = mix64(seed);
    for b in name.bytes() {
        h = mix64(h ^ u64::from(b));
    }
    h = mix64(h ^ index);
    let lo = mix64(h ^ 0x5151);
    Rng::seed_from_u64(h ^ lo.rotate_left(17))
}

/// Uniform in [0, 1) from 53 random bits.
#[inline]
pub fn unit(rng: &mut Rng) -> f64 {
    use rand::Rng as _;
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Exponential with the given mean.
#[inline]
pub fn exp_mean(rng: &mut Rng, mean: f64) -> f64 {
    -mean * (1.0 - unit(rng)).ln()
}

/// Standard normal (Box-Muller; one of the pair is dropped for simplicity of state).
#[inline]
pub fn normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - unit(rng);
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Poisson count with mean `lambda`: exact by inversion below 30, normal approximation above.
#[inline]
pub fn poisson(rng: &mut Rng, lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 0.0;
    }
    if lambda < 30.0 {
        let l = (-lambda).exp();
        let mut k = 0.0;
        let mut p = unit(rng);
        while p > l {
            k += 1.0;
            p *= unit(rng);
        }
        k
    } else {
        (lambda + lambda.sqrt() * normal(rng)).round().max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        use rand::Rng as _;
        let a: Vec<u64> = (0..4).map(|_| stream(7, "grid", 0).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(stream(7, "grid", 0).next_u64(), stream(7, "grid", 1).next_u64());
        assert_ne!(stream(7, "grid", 0).next_u64(), stream(8, "grid", 0).next_u64());
        assert_ne!(stream(7, "grid", 0).next_u64(), stream(7, "market", 0).next_u64());
    }

    #[test]
    fn poisson_and_normal_moments() {
        let mut r = stream(1, "t", 0);
        for lambda in [0.5, 4.0, 12.0, 100.0] {
            let n = 40_000;
            let xs: Vec<f64> = (0..n).map(|_| poisson(&mut r, lambda)).collect();
            let m = xs.iter().sum::<f64>() / n as f64;
            let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
            assert!((m / lambda - 1.0).abs() < 0.03, "mean {m} for {lambda}");
            assert!((v / lambda - 1.0).abs() < 0.08, "var {v} for {lambda}");
        }
        let xs: Vec<f64> = (0..40_000).map(|_| normal(&mut r)).collect();
        let m = xs.iter().sum::<f64>() / 40_000.0;
        let v = xs.iter().map(|x| x * x).sum::<f64>() / 40_000.0;
        assert!(m.abs() < 0.02 && (v - 1.0).abs() < 0.03, "{m} {v}");
    }
}
