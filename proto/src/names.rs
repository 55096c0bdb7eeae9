//! Closed enums named on the wire: one table per enum gives each variant its name, from
//! which serde's names (what utoipa documents), `ALL`, `as_str`, `parse` and `Display`
//! all come, so they cannot disagree.

/// `closed_names! { /// doc  pub enum Name { /// doc  Variant = "name", ... } }`. The names are
/// `tt`, not `literal`: a `literal` fragment reaches the derives wrapped in an invisible group,
/// which utoipa does not read as a serde rename.
macro_rules! closed_names {
    ($(#[$doc:meta])* pub enum $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:tt,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant,)*
        }

        impl $name {
            pub const ALL: [$name; [$($text),*].len()] = [$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                $name::ALL.into_iter().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
