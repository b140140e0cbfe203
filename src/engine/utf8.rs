//! Token pieces are bytes, not text: one multibyte character (an emoji, a CJK
//! ideograph) is often split over two or three tokens. `Utf8Stream` holds
//! back an incomplete tail until the next piece completes it, so every chunk
//! handed to the caller is whole, valid UTF-8.

#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds a piece and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: from_utf8 just told us this prefix is valid.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never become valid: replace them
                        // rather than stall the stream forever.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream; an unfinished character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_characters_split_across_pieces_at_every_byte() {
        let text = "héllo 日本語 🎉 ok";
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let mut stream = Utf8Stream::default();
            let mut out = stream.push(&bytes[..split]);
            out += &stream.push(&bytes[split..]);
            out += &stream.finish();
            assert_eq!(out, text, "split at {split}");
        }
    }

    #[test]
    fn byte_by_byte_never_emits_a_partial_character() {
        let text = "🎉🎉 é";
        let mut stream = Utf8Stream::default();
        let mut chunks = Vec::new();
        for b in text.as_bytes() {
            chunks.push(stream.push(std::slice::from_ref(b)));
        }
        assert_eq!(chunks.concat(), text);
        assert!(chunks
            .iter()
            .filter(|c| !c.is_empty())
            .all(|c| c.chars().count() == 1));
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut stream = Utf8Stream::default();
        assert_eq!(stream.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(stream.push(b"\xe6\x97"), "");
        assert_eq!(stream.finish(), "\u{fffd}");
    }
}
