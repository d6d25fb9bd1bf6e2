//! Dotted command-line overrides such as `grpo.group_size=4` or `data.dir="runs/x"`, applied to
//! the parsed TOML table before it is typed. The value is parsed as a TOML value; a bare word that
//! is not valid TOML is taken as a string, so `data.dir=runs/x` works without quotes.

pub(crate) fn apply(root: &mut toml::Table, spec: &str) -> Result<(), String> {
    let (key, raw) = spec.split_once('=').ok_or("expected KEY=VALUE")?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(format!("bad key `{key}`"));
    }
    let value = parse_value(raw.trim());
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = root;
    for part in parents {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    toml::from_str::<toml::Table>(&doc)
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_nested_values_with_typed_and_bare_values() {
        let mut t: toml::Table = toml::from_str("[grpo]\ngroup_size = 8\n").unwrap();
        apply(&mut t, "grpo.group_size=4").unwrap();
        apply(&mut t, "data.dir=runs/x").unwrap();
        apply(&mut t, "grpo.temperature = 0.7").unwrap();
        assert_eq!(t["grpo"]["group_size"].as_integer(), Some(4));
        assert_eq!(t["grpo"]["temperature"].as_float(), Some(0.7));
        assert_eq!(t["data"]["dir"].as_str(), Some("runs/x"));
    }

    #[test]
    fn rejects_malformed_specs() {
        let mut t: toml::Table = toml::from_str("x = 1\n").unwrap();
        assert!(apply(&mut t, "no_equals").is_err());
        assert!(apply(&mut t, "a..b=1").is_err());
        assert!(apply(&mut t, "x.y=1").unwrap_err().contains("`x` is not a table"));
    }
}
