//! Pixels of a [`Heatmap`]: plotters' bitmap backend draws the cells, rules and colour scale;
//! the text is laid out and rasterized with ab_glyph from the built-in font (plotters' own
//! ab_glyph text drops each glyph's side bearing, which spaces digits and points unevenly),
//! then the picture is encoded as an 8-bit RGB PNG.

use super::{heatmap_size, Heatmap, CELL_H, CELL_W, LEFT, MIN_SCALE, TOP};
use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::prelude::*;

/// DejaVu Sans 2.37 (Bitstream Vera licence with DejaVu's public-domain changes; see
/// `assets/fonts/README.md`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

const GREY: RGBColor = RGBColor(90, 90, 90);
const MISSING: RGBColor = RGBColor(220, 220, 220);

/// Pale yellow to dark red (ColorBrewer YlOrRd, 9 classes), interpolated.
const RAMP: [(u8, u8, u8); 9] = [
    (255, 255, 204),
    (255, 237, 160),
    (254, 217, 118),
    (254, 178, 76),
    (253, 141, 60),
    (252, 78, 42),
    (227, 26, 28),
    (189, 0, 38),
    (128, 0, 38),
];

/// The colour of `t` in 0..=1.
fn ramp(t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (RAMP.len() - 1) as f64;
    let i = (x.floor() as usize).min(RAMP.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
    let (a, b) = (RAMP[i], RAMP[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Where `v` sits on the log scale `range` (0..=1).
fn position(v: f64, range: (f64, f64)) -> f64 {
    let (lo, hi) = (range.0.ln(), range.1.ln());
    if hi <= lo || !lo.is_finite() || !hi.is_finite() {
        return 0.0;
    }
    ((v.max(f64::MIN_POSITIVE).ln() - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// Black or white, whichever reads better on `c`.
fn ink(c: RGBColor) -> RGBColor {
    let l = 0.299 * f64::from(c.0) + 0.587 * f64::from(c.1) + 0.114 * f64::from(c.2);
    if l > 140.0 {
        BLACK
    } else {
        WHITE
    }
}

/// Horizontal anchor of a text.
#[derive(Clone, Copy)]
enum Align {
    Left,
    Center,
    Right,
}

/// A line of text to draw: its anchor point (the middle of the line, vertically).
struct Label {
    text: String,
    at: (i32, i32),
    size: f32,
    color: RGBColor,
    align: Align,
}

fn label(
    text: impl Into<String>,
    at: (i32, i32),
    size: f32,
    color: RGBColor,
    align: Align,
) -> Label {
    Label {
        text: text.into(),
        at,
        size,
        color,
        align,
    }
}

/// Width in pixels of `text` at `size`.
fn text_width(font: &FontRef<'_>, text: &str, size: f32) -> f32 {
    let f = font.as_scaled(PxScale::from(size));
    let mut width = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            width += f.kern(p, id);
        }
        width += f.h_advance(id);
        prev = Some(id);
    }
    width
}

/// `text` broken at spaces into lines at most `width` pixels wide, `max_lines` at most (the
/// last one ending in an ellipsis when text is left over).
fn wrap(font: &FontRef<'_>, text: &str, size: f32, width: f32, max_lines: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let candidate = if line.is_empty() {
            word.to_string()
        } else {
            format!("{line} {word}")
        };
        if !line.is_empty() && text_width(font, &candidate, size) > width {
            lines.push(std::mem::replace(&mut line, word.to_string()));
        } else {
            line = candidate;
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(last) = lines.last_mut() {
            while !last.is_empty() && text_width(font, &format!("{last} \u{2026}"), size) > width {
                last.pop();
            }
            last.push_str(" \u{2026}");
        }
    }
    lines
}

/// Draws `l` into the RGB buffer `buf` of width `w` and height `h`, blending by coverage.
fn paint(buf: &mut [u8], (w, h): (u32, u32), font: &FontRef<'_>, l: &Label) {
    let scale = PxScale::from(l.size);
    let f = font.as_scaled(scale);
    let width = text_width(font, &l.text, l.size);
    let x0 = l.at.0 as f32
        - match l.align {
            Align::Left => 0.0,
            Align::Center => width / 2.0,
            Align::Right => width,
        };
    // The baseline that puts the middle of the font's ascent..descent span on the anchor.
    let baseline = l.at.1 as f32 + (f.ascent() + f.descent()) / 2.0;
    let mut pen = x0;
    let mut prev = None;
    for c in l.text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            pen += f.kern(p, id);
        }
        prev = Some(id);
        let glyph = id.with_scale_and_position(scale, point(pen, baseline));
        pen += f.h_advance(id);
        let Some(outlined) = font.outline_glyph(glyph) else {
            continue;
        };
        let b = outlined.px_bounds();
        outlined.draw(|gx, gy, coverage| {
            let x = b.min.x as i64 + i64::from(gx);
            let y = b.min.y as i64 + i64::from(gy);
            if x < 0 || y < 0 || x >= i64::from(w) || y >= i64::from(h) {
                return;
            }
            let at = ((y as usize) * (w as usize) + x as usize) * 3;
            let a = coverage.clamp(0.0, 1.0);
            for (k, c) in [l.color.0, l.color.1, l.color.2].into_iter().enumerate() {
                if let Some(p) = buf.get_mut(at + k) {
                    *p = (f32::from(*p) * (1.0 - a) + f32::from(c) * a).round() as u8;
                }
            }
        });
    }
}

/// The heatmap as PNG bytes; an error says what failed.
pub fn render(map: &Heatmap) -> Result<Vec<u8>, String> {
    let (nr, nc) = (map.row_labels.len(), map.col_labels.len());
    if map.values.len() != nr * nc {
        return Err(format!("{} values for {nr} x {nc} cells", map.values.len()));
    }
    let font = FontRef::try_from_slice(FONT).map_err(|e| format!("the built-in font: {e}"))?;
    let (w, h) = heatmap_size(nr, nc);
    let mut buf = vec![255u8; (w as usize) * (h as usize) * 3];
    let labels = {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let labels = draw(&root, map, &font).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
        labels
    };
    for l in &labels {
        paint(&mut buf, (w, h), &font, l);
    }
    let mut png_bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut png_bytes, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&buf).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(png_bytes)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

/// Draws the shapes and returns the text to paint over them.
fn draw(root: &Area<'_>, map: &Heatmap, font: &FontRef<'_>) -> Result<Vec<Label>, DrawError> {
    let (nr, nc) = (map.row_labels.len() as i32, map.col_labels.len() as i32);
    let (cw, ch) = (CELL_W as i32, CELL_H as i32);
    let (left, top) = (LEFT as i32, TOP as i32);
    let (w, _) = heatmap_size(nr as usize, nc as usize);
    let text_width = (w as f32) - 32.0;
    let mut labels = Vec::new();
    root.fill(&WHITE)?;

    labels.push(label(&map.title, (16, 22), 21.0, BLACK, Align::Left));
    let mut y = 50;
    for (k, line) in map.subtitle.iter().enumerate() {
        let max = if k + 1 == map.subtitle.len() { 2 } else { 1 };
        for l in wrap(font, line, 13.0, text_width, max) {
            labels.push(label(l, (16, y), 13.0, GREY, Align::Left));
            y += 18;
        }
    }
    // Axis titles: rows (K) above the row labels, columns (V) centred over the cells.
    labels.push(label(
        format!("{} \u{2193}", map.row_title),
        (16, top - 14),
        15.0,
        BLACK,
        Align::Left,
    ));
    labels.push(label(
        format!("{} \u{2192}", map.col_title),
        (left + nc * cw / 2, top - 62),
        15.0,
        BLACK,
        Align::Center,
    ));
    for (j, (name, sub)) in map.col_labels.iter().enumerate() {
        let x = left + j as i32 * cw + cw / 2;
        labels.push(label(name, (x, top - 36), 14.0, BLACK, Align::Center));
        labels.push(label(sub, (x, top - 18), 11.0, GREY, Align::Center));
    }
    for (i, (name, sub)) in map.row_labels.iter().enumerate() {
        let y = top + i as i32 * ch + ch / 2;
        labels.push(label(name, (16, y), 14.0, BLACK, Align::Left));
        labels.push(label(sub, (left - 10, y), 11.0, GREY, Align::Right));
    }
    for i in 0..nr {
        for j in 0..nc {
            let v = map.values[(i * nc + j) as usize];
            let (x0, y0) = (left + j * cw, top + i * ch);
            let fill = if v.is_finite() {
                ramp(position(v, map.range))
            } else {
                MISSING
            };
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + cw, y0 + ch)],
                fill.filled(),
            ))?;
            root.draw(&Rectangle::new([(x0, y0), (x0 + cw, y0 + ch)], WHITE))?;
            let text = if v.is_finite() {
                (map.label)(v)
            } else {
                "-".into()
            };
            labels.push(label(
                text,
                (x0 + cw / 2, y0 + ch / 2),
                13.0,
                ink(fill),
                Align::Center,
            ));
        }
    }

    // The colour scale: a bar as tall as the cells (at least MIN_SCALE px), ticks at both ends and
    // at powers of 10 spaced at least 20 px apart.
    let (bx, bw) = (left + nc * cw + 30, 20);
    let (b0, b1) = (top, top + (nr * ch).max(MIN_SCALE as i32));
    labels.push(label(
        &map.legend,
        (bx - 4, top - 14),
        13.0,
        BLACK,
        Align::Left,
    ));
    let span = b1 - b0;
    for y in b0..b1 {
        let t = 1.0 - f64::from(y - b0) / f64::from(span);
        root.draw(&Rectangle::new(
            [(bx, y), (bx + bw, y + 1)],
            ramp(t).filled(),
        ))?;
    }
    root.draw(&Rectangle::new([(bx, b0), (bx + bw, b1)], GREY))?;
    let tick_y = |t: f64| b1 - (position(t, map.range) * f64::from(span)).round() as i32;
    let (lo, hi) = map.range;
    let mut ticks: Vec<(f64, i32)> = vec![(lo, tick_y(lo)), (hi, tick_y(hi))];
    if hi > lo && lo > 0.0 {
        let decades = (hi / lo).log10();
        let px_per_decade = f64::from(span) / decades.max(1e-9);
        let step = (20.0 / px_per_decade).ceil().max(1.0);
        let mut p = 10f64.powf(lo.log10().ceil());
        while p <= hi {
            let y = tick_y(p);
            if ticks.iter().all(|&(_, ty)| (ty - y).abs() >= 16) {
                ticks.push((p, y));
            }
            p *= 10f64.powf(step);
        }
    }
    for (t, y) in ticks {
        root.draw(&PathElement::new(
            vec![(bx + bw, y), (bx + bw + 5, y)],
            GREY,
        ))?;
        labels.push(label(
            (map.label)(t),
            (bx + bw + 9, y),
            12.0,
            BLACK,
            Align::Left,
        ));
    }

    let mut y = b1.max(top + nr * ch) + 22;
    let mut lines = 0;
    for note in &map.notes {
        for l in wrap(font, note, 12.0, text_width, 3 - lines.min(3)) {
            labels.push(label(l, (16, y), 12.0, GREY, Align::Left));
            y += 18;
            lines += 1;
        }
    }
    Ok(labels)
}
