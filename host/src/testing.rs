//! Helpers for the host's unit tests (compiled only for them).

// Test code: a poisoned lock is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

/// The messages of the WARN events `f` logs on this thread.
pub(crate) fn warnings(f: impl FnOnce()) -> Vec<String> {
    use tracing_subscriber::layer::SubscriberExt;
    struct Warns(Arc<Mutex<Vec<String>>>);
    struct Message<'a>(&'a mut String);
    impl tracing::field::Visit for Message<'_> {
        fn record_debug(&mut self, _: &tracing::field::Field, v: &dyn std::fmt::Debug) {
            self.0.push_str(&format!("{v:?}"));
        }
    }
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warns {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            if *e.metadata().level() == tracing::Level::WARN {
                let mut text = String::new();
                e.record(&mut Message(&mut text));
                self.0.lock().unwrap().push(text);
            }
        }
    }
    let got = Arc::new(Mutex::new(Vec::new()));
    let sub = tracing_subscriber::registry().with(Warns(got.clone()));
    tracing::subscriber::with_default(sub, f);
    let got = got.lock().unwrap().clone();
    got
}
