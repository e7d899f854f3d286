//! Header edits for one direction: the `[request]` or `[response]` table.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_sdk::HeaderChanges;

use crate::header;

/// A `[request]` or `[response]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditSettings {
    /// Headers to set, replacing every value the message had.
    #[serde(default)]
    set: BTreeMap<String, String>,
    /// Headers to append after any values the message has.
    #[serde(default)]
    add: BTreeMap<String, String>,
    /// Headers to remove.
    #[serde(default)]
    remove: Vec<String>,
}

/// Checked header edits, ready to hand to the gateway.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    changes: HeaderChanges,
}

// === impl HeaderEdits ===

impl HeaderEdits {
    /// Checks the table called `section` in error messages.
    pub fn new(settings: EditSettings, section: &str) -> Result<Self, String> {
        let changes = HeaderChanges {
            remove: removals(settings.remove, &format!("{section}.remove"))?,
            set: header::table(settings.set, &format!("{section}.set"))?,
            add: header::table(settings.add, &format!("{section}.add"))?,
        };
        Ok(HeaderEdits { changes })
    }

    /// Whether there is nothing to edit.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The edits for one message.
    pub fn changes(&self) -> HeaderChanges {
        self.changes.clone()
    }
}

fn removals(names: Vec<String>, setting: &str) -> Result<Vec<String>, String> {
    let mut checked: Vec<String> = Vec::with_capacity(names.len());
    for raw_name in names {
        let name = header::name(&raw_name, setting)?;
        if checked.contains(&name) {
            return Err(format!("{setting}: {name:?} is listed twice"));
        }
        checked.push(name);
    }
    Ok(checked)
}
