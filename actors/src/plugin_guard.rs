//! The guard around plugin code, a leaf every caller of a plugin uses: a panic in a plugin is
//! caught (the bot stops, the node goes on), and the thread is marked as running plugin code
//! meanwhile, so that the panic hook can tell a plugin's panic from the gateway's own.

use std::panic::AssertUnwindSafe;

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

thread_local! {
    static IN_PLUGIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True while plugin code runs on this thread: a panic hook uses it to tell a plugin's panic
/// (caught, the bot stops) from the gateway's own (the process exits).
pub fn in_plugin() -> bool {
    IN_PLUGIN.with(|f| f.get())
}

/// Marks every poll of the wrapped plugin future as plugin code.
pub(crate) struct PluginCode<F>(pub(crate) F);

impl<F: std::future::Future + Unpin> std::future::Future for PluginCode<F> {
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let before = IN_PLUGIN.with(|f| f.replace(true));
        let out = std::pin::Pin::new(&mut self.0).poll(cx);
        IN_PLUGIN.with(|f| f.set(before));
        out
    }
}

/// Runs plugin code that is not a future (factories, the synchronous part of `handle`),
/// catching a panic and marking the thread as in plugin code meanwhile.
pub(crate) fn plugin_call<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let before = IN_PLUGIN.with(|flag| flag.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    IN_PLUGIN.with(|flag| flag.set(before));
    result.map_err(|p| panic_message(&*p))
}
