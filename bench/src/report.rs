//! The results: a markdown table (figure, ours, peer, ratio, target, pass/fail), the
//! machine, and PNG charts.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

/// One line of the table.
pub struct Row {
    /// What is measured.
    pub figure: String,
    /// Our number, with its unit.
    pub ours: String,
    /// The peer and its number.
    pub peer: String,
    /// Ours relative to the peer, oriented so that higher is better.
    pub ratio: f64,
    /// The target, in words.
    pub target: String,
    /// Whether it is met (`None`: no target, reported only).
    pub pass: Option<bool>,
}

/// The markdown report.
pub fn markdown(rows: &[Row], machine: &str, setup: &str, charts: &[&str]) -> String {
    let mut out = String::from("# logq benchmark results\n\n");
    let _ = writeln!(out, "{setup}\n");
    out.push_str("| figure | ours | peer (same run) | ratio | target | result |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for r in rows {
        let result = match r.pass {
            Some(true) => "pass",
            Some(false) => "**FAIL**",
            None => "reported",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {} | {result} |",
            r.figure, r.ours, r.peer, r.ratio, r.target
        );
    }
    let _ = writeln!(out, "\n## Machine\n\n{machine}\n\n## Charts\n");
    for c in charts {
        let _ = writeln!(out, "![{c}]({c})");
    }
    out
}

/// What this machine is: CPU, cores, memory, kernel, tool versions.
pub fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|_| "not found".into())
    };
    format!(
        "- CPU: {cpu}, {cores} cores available\n- Memory: {mem}\n- Kernel: {}\n- Broker: {}\n- nginx: {}\n- wrk: {}",
        read("/proc/sys/kernel/osrelease").trim(),
        version(&logq_e2e::nisshi_bin().to_string_lossy(), "--version"),
        version("/usr/sbin/nginx", "-v"),
        version("wrk", "-v"),
    )
}

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the chart font (Debian's fonts-dejavu-core).
pub fn register_font() -> anyhow::Result<()> {
    let path = FONT_PATHS.iter().find(|p| Path::new(p).exists()).context(
        "no DejaVuSans.ttf (apt-get install fonts-dejavu-core; scripts/setup.sh bench does)",
    )?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// A bar chart of `bars` (label, value) to `path`.
pub fn bars(path: &Path, title: &str, unit: &str, bars: &[(String, f64)]) -> anyhow::Result<()> {
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (800, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let top = bars.iter().map(|b| b.1).fold(0f64, f64::max).max(1e-9) * 1.2;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d((0..bars.len()).into_segmented(), 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(unit)
            .y_label_formatter(&|v| format_value(*v))
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
                _ => String::new(),
            })
            .label_style(("sans-serif", 15))
            .draw()?;
        let colors = [
            RGBColor(0x8a, 0x8a, 0x8a),
            RGBColor(0x1f, 0x77, 0xb4),
            RGBColor(0xff, 0x7f, 0x0e),
        ];
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            let color = colors[i % colors.len()];
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                color.filled(),
            );
            bar.set_margin(0, 0, 30, 30);
            bar
        }))?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                format_value(*v),
                (SegmentValue::CenterOf(i), *v + top * 0.02),
                ("sans-serif", 16).into_font(),
            )
        }))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

/// Ratios against their targets, one bar each, target marked.
pub fn ratios(path: &Path, rows: &[(String, f64, Option<f64>)]) -> anyhow::Result<()> {
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (900, 60 + 50 * rows.len() as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let right = rows
            .iter()
            .flat_map(|r| [r.1, r.2.unwrap_or(0.0)])
            .fold(1.0f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "ours / peer (higher is better; | = target)",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(260)
            .build_cartesian_2d(0f64..right, (0..rows.len()).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_label_formatter(&|y| match y {
                SegmentValue::CenterOf(i) => rows.get(*i).map(|r| r.0.clone()).unwrap_or_default(),
                _ => String::new(),
            })
            .label_style(("sans-serif", 14))
            .draw()?;
        chart.draw_series(rows.iter().enumerate().map(|(i, (_, v, target))| {
            let met = target.is_none_or(|t| *v >= t);
            let color = if met {
                RGBColor(0x2c, 0xa0, 0x2c)
            } else {
                RGBColor(0xd6, 0x27, 0x28)
            };
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*v, SegmentValue::Exact(i + 1)),
                ],
                color.filled(),
            );
            bar.set_margin(8, 8, 0, 0);
            bar
        }))?;
        chart.draw_series(rows.iter().enumerate().filter_map(|(i, (_, _, target))| {
            let t = (*target)?;
            Some(PathElement::new(
                vec![(t, SegmentValue::Exact(i)), (t, SegmentValue::Exact(i + 1))],
                BLACK.stroke_width(3),
            ))
        }))?;
        chart.draw_series(rows.iter().enumerate().map(|(i, (_, v, _))| {
            Text::new(
                format!("{v:.2}"),
                (*v + right * 0.01, SegmentValue::CenterOf(i)),
                ("sans-serif", 14).into_font(),
            )
        }))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

/// 1234567 -> "1.23M", 0.42 -> "0.42".
pub fn format_value(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Repeated measurements of one figure: their median and range.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// How many.
    pub n: usize,
}

impl Spread {
    /// Of `values` (at least one).
    pub fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            n,
        }
    }

    /// Of one number of each of `runs`.
    pub fn by<T>(runs: &[T], value: impl Fn(&T) -> f64) -> Self {
        Self::of(&runs.iter().map(value).collect::<Vec<_>>())
    }

    /// `median [min-max] of n`, values with [`format_value`].
    pub fn show(&self) -> String {
        format!(
            "{} [{}-{}, n={}]",
            format_value(self.median),
            format_value(self.min),
            format_value(self.max),
            self.n
        )
    }
}
