// A proxy-wasm filter in AssemblyScript, written against Solo.io's
// `@solo-io/proxy-runtime` SDK exactly as its README shows for Envoy: proof
// that filters from a non-Rust proxy-wasm SDK run in Legate unchanged
// (tests/tests/proxy_wasm.rs builds it with `npm ci` + `asc`).
//
// Root id `legate_as`. Requests to `/as-deny` are answered 403 locally; other
// requests get `x-as-request: seen` upstream, and every response gets
// `x-as-config: <the plugin configuration>`.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues,
  GrpcStatusValues, stream_context, send_local_response,
} from "@solo-io/proxy-runtime";

class Root extends RootContext {
  createContext(context_id: u32): Context {
    return new Filter(context_id, this);
  }
}

class Filter extends Context {
  constructor(context_id: u32, root_context: Root) {
    super(context_id, root_context);
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    if (stream_context.headers.request.get(":path") == "/as-deny") {
      send_local_response(403, "as_denied",
        String.UTF8.encode("denied by an AssemblyScript filter\n"), [],
        GrpcStatusValues.InvalidCode);
      return FilterHeadersStatusValues.StopIteration;
    }
    stream_context.headers.request.add("x-as-request", "seen");
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-as-config", this.root_context.getConfiguration());
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new Root(context_id); }, "legate_as");
