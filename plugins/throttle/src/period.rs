//! Parsing quota periods such as `500ms`, `1s`, `5m` or `1h`.

/// The period in milliseconds, or an error that shows the accepted forms.
pub fn parse_millis(text: &str) -> Result<u64, String> {
    let unit_start = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(unit_start);
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(invalid(text)),
    };
    let count: u64 = number.parse().map_err(|_| invalid(text))?;
    match count.checked_mul(millis_per_unit) {
        Some(0) => Err(format!("period {text:?} must be longer than zero")),
        Some(millis) => Ok(millis),
        None => Err(format!("period {text:?} is too long")),
    }
}

fn invalid(text: &str) -> String {
    format!(
        "period {text:?} must be a whole number with a unit: ms, s, m or h (e.g. \"500ms\", \"1s\")"
    )
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn every_unit_is_understood() {
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("1s"), Ok(1_000));
        assert_eq!(parse_millis("2m"), Ok(120_000));
        assert_eq!(parse_millis("1h"), Ok(3_600_000));
    }

    #[test]
    fn malformed_periods_are_refused() {
        for bad in [
            "", "1", "s", "1.5s", "-1s", "1 s", "1S", "1d", "1sec", "+1s",
        ] {
            assert!(parse_millis(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn zero_and_overflowing_periods_are_refused() {
        assert!(parse_millis("0s").unwrap_err().contains("longer than zero"));
        assert!(parse_millis("99999999999999999999h").is_err());
        assert!(
            parse_millis("18446744073709551615h")
                .unwrap_err()
                .contains("too long")
        );
    }
}
