//! `--chart FILE.svg`: price against the power split over time, as a self-contained SVG.
//!
//! Written by hand: an SVG is text, and plotters without its font stack cannot lay out labels.

use std::fmt::Write as _;

use hcp_harness::backtest::ChartPoint;

const W: f64 = 1200.0;
const H: f64 = 560.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 80.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// At most this many points are drawn; longer series are averaged into buckets.
const MAX_POINTS: usize = 2_000;

/// A stacked area: its label, colour and value.
type Layer = (&'static str, &'static str, fn(&ChartPoint) -> f64);

fn bucket(points: &[ChartPoint]) -> Vec<ChartPoint> {
    let k = points.len().div_ceil(MAX_POINTS).max(1);
    points
        .chunks(k)
        .map(|c| {
            let n = c.len() as f64;
            ChartPoint {
                at: c[0].at,
                price_usd_per_mwh: c.iter().map(|p| p.price_usd_per_mwh).sum::<f64>() / n,
                mining_mw: c.iter().map(|p| p.mining_mw).sum::<f64>() / n,
                inference_mw: c.iter().map(|p| p.inference_mw).sum::<f64>() / n,
                curtailed_mw: c.iter().map(|p| p.curtailed_mw).sum::<f64>() / n,
            }
        })
        .collect()
}

fn nice_max(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * p).find(|&v| v >= x).unwrap_or(10.0 * p)
}

/// The chart of one policy's run.
pub fn svg(title: &str, points: &[ChartPoint]) -> String {
    let pts = bucket(points);
    let n = pts.len().max(2) as f64;
    let mw_max = nice_max(pts.iter().map(|p| p.mining_mw + p.inference_mw + p.curtailed_mw).fold(0.0, f64::max));
    let price_max = nice_max(pts.iter().map(|p| p.price_usd_per_mwh).fold(0.0, f64::max));
    let price_min = pts.iter().map(|p| p.price_usd_per_mwh).fold(0.0, f64::min);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |i: usize| LEFT + pw * i as f64 / (n - 1.0);
    let y_mw = |v: f64| TOP + ph * (1.0 - v / mw_max);
    let y_price = |v: f64| TOP + ph * (1.0 - (v - price_min) / (price_max - price_min).max(1e-9));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<title>{title}</title><rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{LEFT}" y="24" font-size="16">{title}</text>"#);
    // Stacked areas: inference at the bottom, then mining, then curtailed.
    let layers: [Layer; 3] = [
        ("inference (GPU) MW", "#6a3d9a", |p| p.inference_mw),
        ("mining (ASIC) MW", "#33a02c", |p| p.mining_mw),
        ("curtailed ASIC MW", "#fdbf6f", |p| p.curtailed_mw),
    ];
    let mut base = vec![0.0; pts.len()];
    for (label, colour, f) in layers {
        let top: Vec<f64> = pts.iter().zip(&base).map(|(p, b)| b + f(p)).collect();
        let mut d = String::new();
        for (i, v) in top.iter().enumerate() {
            let _ = write!(d, "{}{:.1},{:.1} ", if i == 0 { "M" } else { "L" }, x(i), y_mw(*v));
        }
        for (i, v) in base.iter().enumerate().rev() {
            let _ = write!(d, "L{:.1},{:.1} ", x(i), y_mw(*v));
        }
        let _ = writeln!(
            s,
            r#"<path d="{d}Z" fill="{colour}" fill-opacity="0.75" stroke="none"><title>{label}</title></path>"#
        );
        base = top;
    }
    let mut d = String::new();
    for (i, p) in pts.iter().enumerate() {
        let _ = write!(d, "{}{:.1},{:.1} ", if i == 0 { "M" } else { "L" }, x(i), y_price(p.price_usd_per_mwh));
    }
    let _ = writeln!(
        s,
        r##"<path d="{d}" fill="none" stroke="#e31a1c" stroke-width="1"><title>real-time price USD/MWh</title></path>"##
    );
    // Axes, ticks and labels.
    let _ = writeln!(
        s,
        r#"<g stroke="black"><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}"/><line x1="{}" y1="{TOP}" x2="{}" y2="{}"/><line x1="{LEFT}" y1="{}" x2="{}" y2="{}"/></g>"#,
        TOP + ph,
        LEFT + pw,
        LEFT + pw,
        TOP + ph,
        TOP + ph,
        LEFT + pw,
        TOP + ph
    );
    let mw_decimals = if mw_max < 10.0 { 1 } else { 0 };
    for k in 0..=5 {
        let f = k as f64 / 5.0;
        let yy = TOP + ph * (1.0 - f);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{:.*}</text>"#,
            LEFT - 6.0,
            yy + 4.0,
            mw_decimals,
            mw_max * f
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="start">{:.0}</text>"#,
            LEFT + pw + 6.0,
            yy + 4.0,
            price_min + (price_max - price_min) * f
        );
    }
    for k in 0..=6 {
        let i = ((pts.len() - 1) as f64 * k as f64 / 6.0).round() as usize;
        let day = pts[i.min(pts.len() - 1)].at.to_string();
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(i),
            TOP + ph + 18.0,
            &day[..10.min(day.len())]
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">power (MW)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" transform="rotate(90 {:.1} {:.1})" text-anchor="middle">real-time price (USD/MWh)</text>"#,
        W - 20.0,
        TOP + ph / 2.0,
        W - 20.0,
        TOP + ph / 2.0
    );
    let legend = [
        ("#6a3d9a", "inference (GPU) MW"),
        ("#33a02c", "mining (ASIC) MW"),
        ("#fdbf6f", "curtailed ASIC MW"),
        ("#e31a1c", "real-time price"),
    ];
    for (k, (c, l)) in legend.iter().enumerate() {
        let lx = LEFT + 10.0 + 200.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="12" height="12" fill="{c}"/><text x="{:.1}" y="{:.1}">{l}</text>"#,
            H - 22.0,
            lx + 16.0,
            H - 12.0
        );
    }
    s.push_str("</svg>\n");
    s
}
