//! A service's counters: atomics bumped where things happen, and their snapshot as the API
//! shows them (`/stats`), both from one list of names.

/// `counters! { /// doc  Stats, Snapshot; /// doc  name, ... }`
macro_rules! counters {
    ($(#[$sdoc:meta])* $stats:ident, $snapshot:ident; $($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $(#[$sdoc])*
        #[derive(Debug, Default)]
        pub struct $stats {
            $($(#[$doc])* pub $name: std::sync::atomic::AtomicU64,)*
        }

        #[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
        pub struct $snapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl $stats {
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $($name: self.$name.load(std::sync::atomic::Ordering::Relaxed),)*
                }
            }
        }
    };
}
