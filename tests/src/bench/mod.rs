//! The benchmark runner every `cargo xtask bench NAME` uses.
//!
//! A benchmark measures a candidate and a baseline in the same run, interleaved round by round
//! (A B A B ...), so that drift of the machine (frequency, other load) hits both alike. Each
//! round yields named figures for each side; the report gives per figure the median of the
//! candidate, the median of the baseline, and the median of the per-round ratios
//! candidate/baseline. It is printed and written as JSON to `<out>/<name>.json`.
pub mod apiserver;
pub mod cni;
pub mod lb;
pub mod lb_agent;
pub mod overlay;
pub mod policy;
pub mod tc_rewrite;

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{Context, Result, bail};
use serde_json::json;

/// Named measurements of one side in one round (e.g. `"hit_ns_per_packet" -> 41.0`).
pub type Figures = BTreeMap<&'static str, f64>;

/// One figure across all rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct FigureReport {
    pub candidate: Vec<f64>,
    pub baseline: Vec<f64>,
    pub candidate_median: f64,
    pub baseline_median: f64,
    /// Median of candidate/baseline per round.
    pub ratio_median: f64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    pub candidate: String,
    pub baseline: String,
    pub unit: String,
    pub rounds: u32,
    pub figures: BTreeMap<&'static str, FigureReport>,
}

/// What a benchmark compares.
pub struct Sides<'a> {
    pub candidate_label: &'a str,
    pub baseline_label: &'a str,
    pub unit: &'a str,
}

/// Runs `rounds` rounds of candidate then baseline, and reports.
pub fn interleave(
    name: &str,
    sides: Sides<'_>,
    rounds: u32,
    mut candidate: impl FnMut() -> Result<Figures>,
    mut baseline: impl FnMut() -> Result<Figures>,
) -> Result<Report> {
    if rounds == 0 {
        bail!("a benchmark needs at least one round");
    }
    let mut a_rounds = Vec::new();
    let mut b_rounds = Vec::new();
    for round in 1..=rounds {
        a_rounds.push(candidate().with_context(|| format!("candidate, round {round}"))?);
        b_rounds.push(baseline().with_context(|| format!("baseline, round {round}"))?);
    }
    compare(name, sides, &a_rounds, &b_rounds)
}

/// The report of figures measured round by round on both sides (same number of rounds, the
/// candidate's figures all present on the baseline).
pub fn compare(
    name: &str,
    sides: Sides<'_>,
    a_rounds: &[Figures],
    b_rounds: &[Figures],
) -> Result<Report> {
    if a_rounds.is_empty() || a_rounds.len() != b_rounds.len() {
        bail!("{name}: the sides have {} and {} rounds", a_rounds.len(), b_rounds.len());
    }
    let mut figures = BTreeMap::new();
    for &figure in a_rounds[0].keys() {
        let pick = |rounds: &[Figures], side: &str| -> Result<Vec<f64>> {
            rounds
                .iter()
                .map(|r| r.get(figure).copied())
                .collect::<Option<Vec<f64>>>()
                .with_context(|| format!("the {side} did not report `{figure}` in every round"))
        };
        let candidate = pick(a_rounds, "candidate")?;
        let baseline = pick(b_rounds, "baseline")?;
        let ratios: Vec<f64> = candidate.iter().zip(&baseline).map(|(a, b)| a / b).collect();
        figures.insert(
            figure,
            FigureReport {
                candidate_median: median(&candidate),
                baseline_median: median(&baseline),
                ratio_median: median(&ratios),
                candidate,
                baseline,
            },
        );
    }
    Ok(Report {
        name: name.to_string(),
        candidate: sides.candidate_label.to_string(),
        baseline: sides.baseline_label.to_string(),
        unit: sides.unit.to_string(),
        rounds: a_rounds.len() as u32,
        figures,
    })
}

/// The figure `<prefix>_n<n>` of a benchmark measured at several sizes. A handful of names per
/// run: leaking them keeps [`Figures`] keyed by `&'static str`.
pub fn figure(prefix: &str, n: u32) -> &'static str {
    Box::leak(format!("{prefix}_n{n}").into_boxed_str())
}

/// The median (mean of the two middle values for an even count). NaN-free input expected.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

impl Report {
    pub fn print(&self) {
        println!(
            "bench {}: {} vs {} ({} rounds, interleaved; unit: {})",
            self.name, self.candidate, self.baseline, self.rounds, self.unit
        );
        println!("{:<28} {:>14} {:>14} {:>12}", "figure", "candidate", "baseline", "ratio");
        for (figure, r) in &self.figures {
            println!(
                "{figure:<28} {:>14.2} {:>14.2} {:>11.3}x",
                r.candidate_median, r.baseline_median, r.ratio_median
            );
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let figures: serde_json::Map<String, serde_json::Value> = self
            .figures
            .iter()
            .map(|(figure, r)| {
                let value = json!({
                    "candidate_median": r.candidate_median,
                    "baseline_median": r.baseline_median,
                    "ratio_median": r.ratio_median,
                    "candidate": r.candidate,
                    "baseline": r.baseline,
                });
                (figure.to_string(), value)
            })
            .collect();
        json!({
            "name": self.name,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "unit": self.unit,
            "rounds": self.rounds,
            "figures": figures,
        })
    }

    /// Writes `<dir>/<name>.json` and returns its path.
    pub fn write_json(&self, dir: &Path) -> Result<std::path::PathBuf> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.name));
        fs::write(&path, serde_json::to_string_pretty(&self.to_json())? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn interleaves_and_takes_the_median_of_per_round_ratios() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut a = [10.0, 20.0, 30.0].into_iter();
        let mut b = [5.0, 5.0, 10.0].into_iter();
        let report = interleave(
            "unit",
            Sides { candidate_label: "a", baseline_label: "b", unit: "ns" },
            3,
            || {
                order.borrow_mut().push('A');
                Ok(Figures::from([("x", a.next().unwrap())]))
            },
            || {
                order.borrow_mut().push('B');
                Ok(Figures::from([("x", b.next().unwrap())]))
            },
        )
        .unwrap();
        assert_eq!(order.into_inner(), vec!['A', 'B', 'A', 'B', 'A', 'B']);
        let x = &report.figures["x"];
        assert_eq!(x.candidate_median, 20.0);
        assert_eq!(x.baseline_median, 5.0);
        // Ratios per round are 2, 4, 3: the median is 3 (not 20 / 5 = 4).
        assert_eq!(x.ratio_median, 3.0);
        assert_eq!(report.to_json()["figures"]["x"]["ratio_median"], 3.0);
    }

    #[test]
    fn a_figure_missing_in_a_round_is_an_error() {
        let mut first = true;
        let result = interleave(
            "unit",
            Sides { candidate_label: "a", baseline_label: "b", unit: "ns" },
            2,
            || Ok(Figures::from([("x", 1.0)])),
            || {
                let figures =
                    if first { Figures::from([("x", 1.0)]) } else { Figures::from([("y", 1.0)]) };
                first = false;
                Ok(figures)
            },
        );
        assert!(result.is_err());
    }
}
