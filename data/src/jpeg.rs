//! Is a JPEG file complete? The `image` crate's JPEG decoder is lenient: a file cut short
//! decodes without an error, the missing part filled with grey, where PIL refuses it ("image
//! file is truncated"). [`check_complete`] walks the file's marker segments and the
//! entropy-coded data of every scan and requires the end-of-image marker (EOI, `FF D9`) that
//! every encoder writes, so a truncated file is refused before it is decoded.
//!
//! Only the structure is checked: markers and segment lengths (ITU-T T.81, annex B). Inside a
//! scan a `FF` byte is followed by `00` (a stuffed data byte), `D0`-`D7` (a restart marker),
//! another `FF` (fill) or the marker that ends the scan.

/// Start of image.
const SOI: u8 = 0xD8;
/// End of image.
const EOI: u8 = 0xD9;
/// Start of scan: entropy-coded data follows its header.
const SOS: u8 = 0xDA;

/// Whether `bytes` start like a JPEG file (SOI followed by a marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && bytes[0] == 0xFF && bytes[1] == SOI && bytes[2] == 0xFF
}

/// `Ok` when the JPEG in `bytes` reaches its end-of-image marker with every segment whole;
/// otherwise what is wrong, for an error message (the caller names the file).
pub fn check_complete(bytes: &[u8]) -> Result<(), String> {
    if !is_jpeg(bytes) {
        return Err("not a JPEG file (no start-of-image marker)".into());
    }
    let truncated =
        || Err(format!("the file is truncated: its {} bytes end before the JPEG end-of-image marker", bytes.len()));
    let mut pos = 2;
    loop {
        // A marker: one or more FF bytes, then its code.
        if bytes.get(pos) != Some(&0xFF) {
            return match bytes.get(pos) {
                None => truncated(),
                Some(b) => Err(format!("byte {pos}: expected a JPEG marker, found {b:#04x}")),
            };
        }
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&code) = bytes.get(pos) else {
            return truncated();
        };
        pos += 1;
        match code {
            EOI => return Ok(()),
            // Markers without a length: TEM and stray restart markers.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(&hi), Some(&lo)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return truncated();
        };
        let length = usize::from(u16::from_be_bytes([hi, lo]));
        if length < 2 {
            return Err(format!("byte {pos}: marker {code:#04x} has an impossible segment length {length}"));
        }
        pos += length;
        if pos > bytes.len() {
            return truncated();
        }
        if code == SOS {
            match end_of_scan(bytes, pos) {
                Some(end) => pos = end,
                None => return truncated(),
            }
        }
    }
}

/// The position of the marker that ends the entropy-coded data starting at `pos`, or `None` when
/// the data runs to the end of the file.
fn end_of_scan(bytes: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let ff = pos + bytes.get(pos..)?.iter().position(|&b| b == 0xFF)?;
        match bytes.get(ff + 1)? {
            0x00 | 0xD0..=0xD7 => pos = ff + 2,
            // Fill bytes before a marker: the marker starts at the first FF.
            _ => return Some(ff),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A noisy grey JPEG of a few tens of kilobytes, as an encoder writes it.
    pub(crate) fn noisy_jpeg(side: u32) -> Vec<u8> {
        let mut state = 12345u32;
        let img = image::GrayImage::from_fn(side, side, |x, y| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            image::Luma([((x + y) as u8).wrapping_add((state >> 24) as u8 / 4)])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_whole_jpeg_is_complete_and_every_cut_of_it_is_not() {
        let bytes = noisy_jpeg(96);
        check_complete(&bytes).unwrap();
        // Trailing bytes after EOI (some scanners write them) are not a truncation.
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        check_complete(&padded).unwrap();
        for cut in [3, 20, 200, bytes.len() / 2, bytes.len() - 2, bytes.len() - 1] {
            let e = check_complete(&bytes[..cut]).unwrap_err();
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn not_a_jpeg_is_said_so() {
        assert!(check_complete(b"\x89PNG\r\n").unwrap_err().contains("not a JPEG"));
        assert!(!is_jpeg(b"\xFF\xD8"));
    }
}
