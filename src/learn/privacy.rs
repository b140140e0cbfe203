//! The privacy filter: secrets are never learned.
//!
//! A message, or a candidate preference's evidence and target, that holds a
//! password, an API key or token, a payment card number, an IBAN, a
//! government ID, a phone number or an e-mail address is skipped. Only the
//! kind and the count are kept, never the content.
//!
//! Checks are structural where a structure exists (Luhn for cards, mod-97
//! for IBANs, known key prefixes), and contextual otherwise ("my password
//! is …", "SSN …"): a bare number is not treated as a secret unless it
//! passes a checksum or is introduced as one.

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    Password,
    ApiKey,
    PaymentCard,
    Iban,
    GovernmentId,
    PhoneNumber,
    Email,
}

impl SecretKind {
    pub fn describe(self) -> &'static str {
        match self {
            SecretKind::Password => "a password or passphrase",
            SecretKind::ApiKey => "an API key or token",
            SecretKind::PaymentCard => "a payment card number",
            SecretKind::Iban => "a bank account number (IBAN)",
            SecretKind::GovernmentId => "a government ID number",
            SecretKind::PhoneNumber => "a phone number",
            SecretKind::Email => "an e-mail address",
        }
    }
}

fn re(pattern: &str) -> Regex {
    // The patterns are constants of this file; a typo is a bug caught by
    // the unit tests below.
    Regex::new(pattern).unwrap_or_else(|e| panic!("bad privacy pattern {pattern}: {e}"))
}

static PASSWORD: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(pass ?words?|pass ?phrases?|passcodes?|pwd|pin(?: code| number)?|login|credentials?|wi-?fi key|security answer)\b\s*(?:is|was|:|=|are|reads|will be)\s*\S+",
    )
});
static KEY_PREFIXED: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_\-]{30,}|xox[abprs]-[A-Za-z0-9\-]{10,}|glpat-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})",
    )
});
static KEY_CONTEXT: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:api[ _-]?key|access[ _-]?key|secret[ _-]?key|secret|token|bearer|private key|client secret)\b\s*(?:is|:|=)?\s*([A-Za-z0-9_\-+/=]{16,})",
    )
});
static PEM: LazyLock<Regex> = LazyLock::new(|| re(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"));
static CARD: LazyLock<Regex> = LazyLock::new(|| re(r"\b\d(?:[ \-]?\d){12,18}\b"));
static IBAN: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b"));
static SSN: LazyLock<Regex> = LazyLock::new(|| re(r"\b\d{3}-\d{2}-\d{4}\b"));
static GOV_CONTEXT: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:ssn|social security(?: number)?|passport(?: number| no\.?)?|national (?:id|insurance)(?: number)?|driver'?s licen[cs]e(?: number)?|tax (?:id|number)|nif|dni|nie|aadhaar|personal id(?:entity)? (?:number|code)|id (?:number|card number))\b[^.\n]{0,20}?[A-Z0-9][A-Z0-9\- ]{4,}\d",
    )
});
static PHONE: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{1,4}\)[\s.\-]?)?\d[\d\s.\-]{6,}\d"));
static PHONE_CONTEXT: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)\b(?:phone|mobile|cell|call me|text me|whatsapp|number is|tel)\b"));
static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)\b[a-z0-9._%+\-]+@[a-z0-9.\-]+\.[a-z]{2,}\b"));

/// Luhn's checksum, used by every payment card number.
pub fn luhn(digits: &str) -> bool {
    let ds: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if ds.len() < 12 {
        return false;
    }
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616 check: move the first four characters to the end, turn
/// letters into numbers (A = 10), and the result mod 97 must be 1.
pub fn iban_valid(text: &str) -> bool {
    let s: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&s.len()) || !s.chars().all(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    let rearranged = format!("{}{}", &s[4..], &s[..4]);
    let mut rem: u32 = 0;
    for c in rearranged.chars() {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        for d in v.to_string().chars() {
            rem = (rem * 10 + d.to_digit(10).unwrap_or(0)) % 97;
        }
    }
    rem == 1
}

/// Every kind of secret found in `text`, each once, in a fixed order.
pub fn scan(text: &str) -> Vec<SecretKind> {
    let mut found = Vec::new();
    let mut add = |k: SecretKind| {
        if !found.contains(&k) {
            found.push(k);
        }
    };
    if PASSWORD.is_match(text) {
        add(SecretKind::Password);
    }
    if KEY_PREFIXED.is_match(text) || PEM.is_match(text) {
        add(SecretKind::ApiKey);
    }
    for c in KEY_CONTEXT.captures_iter(text) {
        // A "token" followed by an ordinary word is not a key: require the
        // mix of letters and digits keys have.
        let value = c.get(1).map(|m| m.as_str()).unwrap_or("");
        if value.chars().any(|c| c.is_ascii_digit())
            && value.chars().any(|c| c.is_ascii_alphabetic())
        {
            add(SecretKind::ApiKey);
        }
    }
    for m in CARD.find_iter(text) {
        let digits: String = m.as_str().chars().filter(char::is_ascii_digit).collect();
        if (13..=19).contains(&digits.len()) && luhn(&digits) {
            add(SecretKind::PaymentCard);
        }
    }
    for m in IBAN.find_iter(text) {
        if iban_valid(m.as_str()) {
            add(SecretKind::Iban);
        }
    }
    if SSN.is_match(text) || GOV_CONTEXT.is_match(text) {
        add(SecretKind::GovernmentId);
    }
    let phone_context = PHONE_CONTEXT.is_match(text);
    for m in PHONE.find_iter(text) {
        let digits = m.as_str().chars().filter(char::is_ascii_digit).count();
        let international = m.as_str().starts_with('+');
        // Years, prices and counts are numbers too: a phone number has
        // 9-15 digits and either a "+" or words that say it is a phone.
        if (9..=15).contains(&digits) && (international || phone_context) {
            let all: String = m.as_str().chars().filter(char::is_ascii_digit).collect();
            if !luhn(&all) || digits < 13 {
                add(SecretKind::PhoneNumber);
            }
        }
    }
    if EMAIL.is_match(text) {
        add(SecretKind::Email);
    }
    found.sort();
    found
}

/// Counts of what was skipped, by kind (shown without content).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SkippedSecrets {
    pub counts: std::collections::BTreeMap<SecretKind, usize>,
}

impl SkippedSecrets {
    pub fn record(&mut self, kinds: &[SecretKind]) {
        for k in kinds {
            *self.counts.entry(*k).or_default() += 1;
        }
    }

    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    pub fn describe(&self) -> String {
        self.counts
            .iter()
            .map(|(k, n)| format!("{n} × {}", k.describe()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<SecretKind> {
        scan(text)
    }

    #[test]
    fn realistic_secrets_are_caught() {
        use SecretKind::*;
        let cases: &[(&str, SecretKind)] = &[
            ("My password is hunter2, don't tell anyone.", Password),
            ("the wifi password: Blue-Falcon-77", Password),
            ("My bank PIN is 4821", Password),
            (
                "Remember my passphrase = correct horse battery staple",
                Password,
            ),
            ("here's my key sk-proj-abc123DEF456ghi789JKL012mno", ApiKey),
            ("token: ghp_16C7e42F292c6912E7710c838347Ae178B4a", ApiKey),
            ("AWS key AKIAIOSFODNN7EXAMPLE in the config", ApiKey),
            ("api_key=9f8e7d6c5b4a39281706f5e4d3c2b1a0", ApiKey),
            (
                "-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXk",
                ApiKey,
            ),
            (
                "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
                ApiKey,
            ),
            ("my card is 4111 1111 1111 1111 exp 12/27", PaymentCard),
            ("Visa 4012-8888-8888-1881", PaymentCard),
            ("amex 378282246310005", PaymentCard),
            ("send it to DE89 3704 0044 0532 0130 00", Iban),
            ("IBAN GB82WEST12345698765432 please", Iban),
            ("my SSN is 078-05-1120", GovernmentId),
            ("passport number X12345678", GovernmentId),
            (
                "My national insurance number is QQ 12 34 56 C",
                GovernmentId,
            ),
            ("call me at +1 (415) 555-2671", PhoneNumber),
            ("my mobile is 0612 345 678", PhoneNumber),
            ("+351 912 345 678 is my whatsapp", PhoneNumber),
            ("write to ana.silva@example.org", Email),
        ];
        for (text, kind) in cases {
            assert!(
                kinds(text).contains(kind),
                "{text:?} → {:?}, expected {kind:?}",
                kinds(text)
            );
        }
    }

    #[test]
    fn ordinary_statements_are_not_secrets() {
        let cases = [
            "I like to dance at the club.",
            "My favorite number is 7.",
            "I was born in 1987 and moved to Porto in 2015.",
            "I paid 1250 euros for my bike.",
            "I run 10 km three times a week.",
            "My password manager of choice is open source.",
            "I keep forgetting my work password.",
            "I work as a security engineer.",
            "The token economy in my game uses coins.",
            "I have 2 kids and 3 cats.",
            "My zip code area is lovely in spring.",
            "I read 52 books last year, about 15000 pages.",
            "Room 4111 at the hotel was great.",
        ];
        for text in cases {
            assert!(
                kinds(text).is_empty(),
                "{text:?} flagged as {:?}",
                kinds(text)
            );
        }
    }

    #[test]
    fn checksums() {
        assert!(luhn("4111111111111111"));
        assert!(!luhn("4111111111111112"));
        assert!(iban_valid("DE89370400440532013000"));
        assert!(!iban_valid("DE89370400440532013001"));
    }
}
