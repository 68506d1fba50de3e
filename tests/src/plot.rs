//! SVG figures for `cargo xtask bench` (plotters, SVG backend only: no
//! fonts or system libraries needed).

use std::path::Path;

use plotters::prelude::*;

/// Named lines of points, in the order their names first came.
#[derive(Default)]
pub struct Series(pub Vec<(String, Vec<(f64, f64)>)>);

impl Series {
    /// Adds point `(x, y)` to the line `name`, starting it if new.
    pub fn add(&mut self, name: &str, x: f64, y: f64) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, points)) => points.push((x, y)),
            None => self.0.push((name.to_string(), vec![(x, y)])),
        }
    }
}

/// Lines on log-log axes, one per `(name, points)`, with a legend.
/// Failures to draw are reported, not fatal: the tables are the record.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) {
    if let Err(e) = draw(path, title, x_desc, y_desc, series) {
        eprintln!("plot {}: {e}", path.display());
    }
}

fn draw(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), Box<dyn std::error::Error>> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err("no points".into());
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (x0.max(0.5) * 0.8..x1 * 1.25).log_scale(),
            (y0.max(0.01) * 0.8..y1 * 1.25).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
