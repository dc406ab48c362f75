//! Plots (PNG and SVG) with plotters: training curves of a run and, for the structure search, the
//! heatmap of candidate probabilities. Text needs a TrueType font, found at run time (no font is
//! shipped): `$DELTATUNE_FONT`, else `fc-match sans-serif`, else the first DejaVu/Liberation/any
//! `.ttf` under the XDG data directories.

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DELTATUNE_FONT").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(p);
    }
    if let Ok(out) = std::process::Command::new("fc-match").args(["-f", "%{file}", "sans-serif"]).output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.is_file() && p.extension().is_some_and(|e| e == "ttf" || e == "otf") {
            return Some(p);
        }
    }
    let dirs = std::env::var("XDG_DATA_DIRS").unwrap_or_else(|_| "/usr/local/share:/usr/share".into());
    let mut found: Vec<PathBuf> = Vec::new();
    for d in dirs.split(':').filter(|d| !d.is_empty()) {
        collect_ttf(&Path::new(d).join("fonts"), &mut found, 4);
    }
    found.sort();
    let rank = |p: &PathBuf| {
        let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        match n.as_str() {
            "DejaVuSans.ttf" => 0,
            "LiberationSans-Regular.ttf" => 1,
            _ if n.contains("Sans") && !n.contains("Bold") && !n.contains("Oblique") => 2,
            _ => 3,
        }
    };
    found.into_iter().min_by_key(rank)
}

fn collect_ttf(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && depth > 0 {
            collect_ttf(&p, out, depth - 1);
        } else if p.extension().is_some_and(|x| x == "ttf") {
            out.push(p);
        }
    }
}

/// Registers a font for plot text once per process.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = find_font().ok_or_else(|| "no TrueType font found for plot text; set DELTATUNE_FONT=/path/to/font.ttf".to_string())?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, leaked)
            .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(Error::Asset)
}

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Asset(format!("writing {}: {e}", path.display()))
}

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A panel: title, axis labels and its lines.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn draw_panels<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, panels: &[Panel], path: &Path) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(draw_err(path))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (area, panel) in areas.iter().zip(panels) {
        let pts: Vec<(f64, f64)> = panel.series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        if pts.is_empty() {
            continue;
        }
        let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
        let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
        if x1 <= x0 {
            x0 -= 1.0;
            x1 += 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        y0 -= pad;
        y1 += pad;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err(path))?;
        chart.configure_mesh().x_desc(&panel.x_label).y_desc(&panel.y_label).draw().map_err(draw_err(path))?;
        for (i, s) in panel.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let drawn = chart.draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2))).map_err(draw_err(path))?;
            drawn.label(&s.name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            // Past ten series the colours repeat: the second round gets hollow triangles.
            if s.points.len() <= 60 && i < COLORS.len() {
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(draw_err(path))?;
            } else if s.points.len() <= 60 {
                chart.draw_series(s.points.iter().map(|&p| TriangleMarker::new(p, 5, c.stroke_width(1)))).map_err(draw_err(path))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err(path))?;
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// Writes `panels` stacked vertically to `path` (PNG or SVG by extension), atomically.
pub fn line_charts(path: &Path, panels: &[Panel], width: u32) -> Result<()> {
    ensure_font()?;
    let height = 360 * panels.len().max(1) as u32;
    let tmp = crate::io::atomic::temp_path(path)?;
    let is_svg = path.extension().is_some_and(|e| e == "svg");
    let drawn = if is_svg {
        draw_panels(SVGBackend::new(&tmp, (width, height)).into_drawing_area(), panels, path)
    } else {
        draw_panels(BitMapBackend::new(&tmp, (width, height)).into_drawing_area(), panels, path)
    };
    crate::io::atomic::finish_temp(&tmp, path, drawn)
}

/// A cell of a heatmap.
pub struct Cell {
    pub row: usize,
    pub col: usize,
    pub value: f64,
    pub marked: bool,
}

/// Writes a heatmap (rows × columns, colour = value in [0, 1], marked cells outlined) to `path`.
pub fn heatmap(path: &Path, title: &str, rows: &[String], cols: &[String], cells: &[Cell]) -> Result<()> {
    ensure_font()?;
    let (w, h) = (220 + 90 * cols.len() as u32, 140 + 40 * rows.len() as u32);
    let tmp = crate::io::atomic::temp_path(path)?;
    let is_svg = path.extension().is_some_and(|e| e == "svg");
    let drawn = if is_svg {
        draw_heatmap(SVGBackend::new(&tmp, (w, h)).into_drawing_area(), title, rows, cols, cells, path)
    } else {
        draw_heatmap(BitMapBackend::new(&tmp, (w, h)).into_drawing_area(), title, rows, cols, cells, path)
    };
    crate::io::atomic::finish_temp(&tmp, path, drawn)
}

fn draw_heatmap<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    rows: &[String],
    cols: &[String],
    cells: &[Cell],
    path: &Path,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(draw_err(path))?;
    let (nr, nc) = (rows.len().max(1), cols.len().max(1));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(100)
        .build_cartesian_2d(0f64..nc as f64, 0f64..nr as f64)
        .map_err(draw_err(path))?;
    chart.configure_mesh().disable_mesh().disable_x_axis().disable_y_axis().draw().map_err(draw_err(path))?;
    // Labels at cell centres, drawn in pixel coordinates (the mesh would put them on the edges).
    let label = ("sans-serif", 14).into_font().color(&BLACK);
    for (i, name) in rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(0.0, (nr - 1 - i) as f64 + 0.5));
        root.draw(&Text::new(name.clone(), (px - 95, py - 7), label.clone())).map_err(draw_err(path))?;
    }
    for (j, name) in cols.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(j as f64 + 0.5, 0.0));
        let (a, b) = name.split_once(' ').unwrap_or((name.as_str(), ""));
        root.draw(&Text::new(a.to_string(), (px - 4 * a.len() as i32, py + 6), label.clone())).map_err(draw_err(path))?;
        root.draw(&Text::new(b.to_string(), (px - 4 * b.len() as i32, py + 24), label.clone())).map_err(draw_err(path))?;
    }
    for c in cells {
        let v = c.value.clamp(0.0, 1.0);
        // White → dark blue.
        let color = RGBColor((255.0 * (1.0 - 0.85 * v)) as u8, (255.0 * (1.0 - 0.65 * v)) as u8, (255.0 * (1.0 - 0.25 * v)) as u8);
        let y = (nr - 1 - c.row) as f64;
        let x = c.col as f64;
        chart.draw_series(std::iter::once(Rectangle::new([(x, y), (x + 1.0, y + 1.0)], color.filled()))).map_err(draw_err(path))?;
        if c.marked {
            chart
                .draw_series(std::iter::once(Rectangle::new([(x + 0.04, y + 0.06), (x + 0.96, y + 0.94)], RGBColor(214, 39, 40).stroke_width(3))))
                .map_err(draw_err(path))?;
        }
        chart
            .draw_series(std::iter::once(Text::new(format!("{:.2}", c.value), (x + 0.3, y + 0.65), ("sans-serif", 14).into_font())))
            .map_err(draw_err(path))?;
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}
