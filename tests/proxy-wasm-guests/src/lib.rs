//! Test filters for Legate's proxy-wasm host, written against the upstream
//! `proxy-wasm` SDK the way Envoy filters are (shaped like the SDK's examples).
//! The plugin configuration (JSON) picks the behaviour with `"mode"`:
//!
//! Modes whose headers callbacks return `Pause` with no call out while a
//! body follows, and expect the body callbacks meanwhile (`body-wait`,
//! `peek`, `stop-a`, `body-local`'s response, `body-callout`,
//! `trailers-callout`, `body-stuck-held`, `late-call`'s `/late/held…`,
//! `tick-resume`'s `/wait/body` and `/wait/response`, `grpc-stream`'s
//! `/await-body`), are Envoy's
//! `StopIteration`: their plugins set `allow_on_headers_stop_iteration`
//! (without it, as in Envoy, the whole message waits for the filter to
//! resume and no body callback comes before).
//!
//! - `headers`: request gets `x-pw-hello: <config "greeting">`, `x-pw-remove` is
//!   removed; a request to `/deny` is answered locally with 403 (`/deny-twice`:
//!   403 `first`, then 451 `second`, in one callback); the response gets
//!   `x-pw-response: 1` and the request's header count, and the response callback
//!   sets request header `x-pw-from-response` (too late: the head is out). On
//!   `/set-all` the request map is replaced (`proxy_set_header_map_pairs`) once
//!   with a bad `:path` (statuses and values after it in `x-pw-set-all-bad`), then
//!   with `:path /replaced`, `x-pw-set-all: good` and `x-keep: kept`.
//! - `properties`: the response carries properties read in each phase as headers.
//!   The request headers callback also sets `request.method` to `SHADOW` (a
//!   built-in name: reads still give the method, as Envoy's) and reads the
//!   request header map's pseudo-headers (`request.headers.:authority`, ...).
//!   It also reads `request.query`, `xds.route_name` and `xds.cluster_name`.
//! - `grpc-stats`: `on_log` counts in metric `pw_grpc_stats_<grpc status>_<trailer
//!   names>_<grpc-message trailer>` what it reads of `response.grpc_status`,
//!   `response.trailers` and `response.trailers.grpc-message` (`none` for a
//!   property not found, `<none>` for the message), in `pw_flags_<n>`
//!   what it reads of `response.flags`, and in `pw_sizes_<req>_<resp>` what
//!   it reads of `request.size` and `response.size`.
//! - `root-done`: the root context ticks (so each worker starts the VM with
//!   the config); its `on_done` counts `pw_root_done_<tag>` (and panics
//!   with `tag: trap`), its `proxy_on_delete` (which drops it) counts
//!   `pw_root_deleted`.
//! - `shared-fill`: a request to `/fill/<n>` sets shared data keys
//!   `pw_fill_0` to `pw_fill_<n-1>` to 1 000 000 bytes each and is answered
//!   200 with `x-pw-fill: <how many read back>`.
//! - `sizes-so-far`: what a byte counter reads of `request.size` and
//!   `response.size` as the exchange goes: counter
//!   `pw_sofar_<at>_<request.size>_<response.size>` in the request headers
//!   callback (`rqhead`), the request body callback at end of stream
//!   (`rqbody`), the response headers callback (`rshead`) and `on_log`
//!   (`log`); the response body callback at end of stream counts
//!   `pw_sofar_rsbody_<response.size>_<that + its chunk's length>`, and the
//!   response headers callback `pw_sofar_total_<bool>`: whether
//!   `request.total_size` is `request.size` plus the request head's names
//!   and values (`none` for a property not found).
//! - `filter-state` (Envoy's filter state shared by a stream's filters; the
//!   config's `tag` is the role): a `writer` sets property `pw_peer` to
//!   request header `x-fs-write` when there is one (`set_property`, in the
//!   request headers callback); a `reader` answers what it reads of `pw_peer`
//!   as `x-fs-req` (request headers callback), `x-fs-state` (the same through
//!   `filter_state.wasm.pw_peer`) and `x-fs-resp` (response headers callback),
//!   and `on_log` counts metric `pw_fs_logged_<value>` (`none` for
//!   `NOT_FOUND`).
//! - `counter`: shared data counter (CAS) and a metric, both incremented per request
//!   and echoed as response headers; ticks every `tick_ms` log and count. Each
//!   request also records 2 on counter `pw_recorded` and 7 and 2000 on
//!   histogram `pw_histogram` (`record_metric`).
//! - `hostile`: by path: `/panic` panics, `/badptr` passes wild pointers to raw
//!   hostcalls, `/badctx` switches to an unknown context, `/loop` spins forever,
//!   `/grow` allocates 64 MiB, `/print` writes to stdout and stderr,
//!   `/unimpl` calls http_call to `backend` (not granted) and reports the status,
//!   `/badstream` continues and closes stream type 9 (`x-pw-badstream`),
//!   `/fdstat` calls WASI `fd_fdstat_get` on fds 0 to 3 (`x-pw-fdstat:
//!   <errno>:<file type>:<base rights>,…`).
//! - `queue`: each request enqueues its path to queue `pw_events`, which the root
//!   context registered; `on_queue_ready` drains it, counting in `pw_dequeued`.
//!   With `burst: n`, each request enqueues it `n` times in one callback and
//!   `on_queue_ready` dequeues one item per call (each enqueue owes a call).
//!   With `target_vm: <vm id>`, requests enqueue to that VM's `pw_events`
//!   instead (a producer feeding another plugin's consumer).
//! - `reject`: `on_configure` returns false. In any mode, `configure_alloc_mib:
//!   N` makes `on_configure` allocate N MiB (a filter that needs memory to
//!   start), `configure_spin_ms: N` spin for N ms of wall time.
//! - `close`: resets the stream (`proxy_close_stream`) from the request headers
//!   callback under `/close-request`, the response headers callback under
//!   `/close-response`, the response body callback under `/close-body`.
//!   `on_log` counts in metric `pw_logged_<response.code>_<response.code_details>`
//!   (`none` for a property not found), as the `stream-` modes do.
//! - `noop`: every callback returns at once.
//! - `self-resume`: both headers callbacks set a header (`x-pw-self` on the
//!   request, `x-pw-self-resp` on the response), call `proxy_continue_stream`
//!   for their direction and return `Pause`.
//! - `many-metrics`: each request defines counters `pw_many_0` to
//!   `pw_many_119` with the SDK's `define_metric` (which panics on an
//!   error), increments each and adds up what `get_metric` reads of them in
//!   `x-pw-many`, then defines `pw_many_0` again as a gauge and records 5.
//! - `emscripten`: as a C++ SDK filter built with Emscripten, the request
//!   headers callback grows the memory by a page and calls the runtime's
//!   `env.emscripten_notify_memory_growth`, then `env.pthread_equal` with two
//!   equal and two different ids; the response gets `x-pw-emscripten: grew
//!   <pages>, equal <1> <0>`.
//! - `callout`: each request pauses on an HTTP call to cluster `authz` (or the
//!   config's `cluster`; path `/check<request path>`, timeout `timeout_ms`,
//!   default 1000); in
//!   `on_http_call_response` a 200 adds its body as request header `x-pw-authz`
//!   and resumes, another status is answered locally with that status and body
//!   (`x-pw-denied: yes`), a failed call (no headers) with 503 `x-pw-call: failed`.
//!   A dispatch error is answered 500 with `x-pw-call-error: <status>`.
//!   Under `/owned` the call also asks for `content-length: 5` (no body);
//!   under `/no-authority` it has `host: authz` and no `:authority`.
//!   `/panic` panics (the VM traps).
//! - `tick-callout`: the root context calls `authz` `/tick` on every tick
//!   (`tick_ms`) and keeps the last body in shared data `pw_tick_body`, which each
//!   request echoes as response header `x-pw-tick-body`.
//!
//! - `body-rewrite`: removes `content-length` in both headers callbacks, returns
//!   `Pause` from the body callbacks until end of stream (Envoy's
//!   StopIterationAndBuffer), then rewrites the whole body: the request's
//!   `hello` becomes `HELLO-WORLD`; the response is wrapped in `<<` (prepended)
//!   and `>>` (appended). The response carries `x-pw-rq-body:
//!   <request body calls>:<body length at end of stream>`. The request body
//!   callback also sets request header `x-pw-late` (too late: the head is out).
//! - `body-wait`: the headers callbacks return `Pause` with no call outstanding
//!   (wait for the body); at end of stream the body callback sets header
//!   `x-pw-body-len` on that head and upper-cases the body (content-length left
//!   to the host).
//! - `peek`: the headers callbacks return `Pause` with no call outstanding
//!   (Envoy's StopIteration) and the body callbacks `Continue` every chunk:
//!   the first one sets header `x-pw-first-chunk: <its length>` on the head
//!   still held, later ones `x-pw-late` (too late: the head went on with the
//!   first chunk).
//! - `stop-a`, `stop-b` (Envoy's `StopIteration`, then the filters after):
//!   `stop-a`'s headers callbacks return `Pause` with no call out when a body
//!   follows, its body callbacks `Pause` until end of stream, which sets
//!   header `x-a: <body length>:<body calls>` on the held request head
//!   (`x-a-resp: <body length>` on the response's) and continues; under
//!   `/mid` the first request body call sets `x-a: mid` and continues (the
//!   head goes on mid-body), as do the later ones. Its request trailers
//!   callback adds trailer `x-a-trailer: <x-client-trailer>`. `stop-b`
//!   records what it sees: its request headers callback sets `x-b-saw-a:
//!   <x-a or ->` and `x-b-eos: <end_of_stream>` and removes
//!   `content-length`; its request body callback continues every chunk and
//!   at end of stream appends `|b:<trace>:<bytes it saw>` to the body
//!   (trace: its callbacks so far, `h` headers, `b` body); its request
//!   trailers callback adds `x-b-saw-trailer: <x-a-trailer or ->`. On the
//!   response the same: `x-b-saw-a-resp: <x-a-resp or ->` (and
//!   `content-length` removed) in the headers callback, and under `/down`
//!   `|B:<trace>` (its response callbacks, `H`, `B`) appended at the end of
//!   the body.
//! - `body-splice`: the request body is held until end of stream, then its
//!   first 5 bytes are replaced with `HELLO` (`set_http_request_body(0, 5,
//!   …)`, Envoy's drain-then-prepend).
//! - `body-local`: the request body is held until end of stream; one containing
//!   `forbidden` is answered 403 from the body callback. The response headers
//!   callback waits for the body (`Pause`); a response body containing `secret`
//!   is replaced by a 451 answered from the response body callback.
//! - `body-stuck`: the request body callback always returns `Pause`, even at
//!   end of stream. `body-stuck-held`: the same after the request headers
//!   callback returned `Pause` (waiting for the body), with no call outstanding.
//! - `body-callout` (a body-checking service, Envoy's way): both headers
//!   callbacks return `Pause` (wait for the body); at end of stream each body
//!   callback sends the whole body to cluster `authz` (`POST
//!   /check/body<path>` for the request, `/check/resp<path>` for the
//!   response) and returns `Pause`; a request path under `/grpc/` sends the
//!   request body as `Echo/Say`'s message on cluster `grpc` instead. In the
//!   call's callback a 200 (gRPC: OK) reads the held body again (its length
//!   as header `x-pw-held-len` on that head), replaces it with the answer's
//!   body (gRPC: `grpc:<reply>`) and resumes; any other answer is a local
//!   response with the answer's body: 403 `x-pw-body-denied: yes` for the
//!   request, 451 `x-pw-resp-denied: yes` for the response.
//! - `stream-callout`, `stream-trailers`: `body-callout` and
//!   `trailers-callout` on streamed bodies (Envoy's most common body check):
//!   the headers callbacks return `Continue` (removing `content-length`, as
//!   the checked body changes size), the body callbacks `Pause` until end of
//!   stream, where the body (or trailer) goes to `authz` as above and the
//!   callback returns `Pause`; the host holds the rest of the message until
//!   the call's callback resumes or answers.
//! - `trailers-callout`: both headers and body callbacks return `Pause`
//!   until the trailers (the whole message waits for them); the
//!   request trailers callback sends trailer `x-client-trailer` (the response
//!   trailers callback: `x-echo-trailer`) to `authz`
//!   (`/check/trailer<path>`) and returns `Pause`; a 200 adds trailer
//!   `x-pw-trailer-checked: <answer>` to those trailers and resumes, else 403
//!   (response: 451) as above.
//! - `trailers`: request trailers get `x-pw-trailer-seen: <x-client-trailer>`
//!   and `x-client-trailer` replaced by `changed`; response trailers get
//!   `x-pw-added: <number of trailers>` and `grpc-message` removed.
//!
//! - `grpc-call`: `/say/<msg>` calls `legate.test.v1.Echo/Say` on cluster `grpc`
//!   (`dispatch_grpc_call`, metadata `x-pw-md: from-proxy-wasm`) and pauses; the
//!   reply's message goes upstream as request header `x-pw-grpc-reply`, and
//!   `x-pw-md-seen: yes` if the server reported the metadata. `/fail/<code>`
//!   calls `Fail` with that code; a failed call is answered with a gRPC local
//!   response (`send_grpc_response`) carrying the call's status and message.
//!   The HTTP callout of `callout` mode reports its trailer count too.
//!
//! - `grpc-cancel`: each request sends a unary `Echo/Say` call on cluster
//!   `grpc` and cancels it at once (`proxy_grpc_cancel`, twice), recording
//!   both results as request header `x-pw-cancel`, then pauses on an HTTP
//!   call to `authz` as `callout` does; a gRPC reply, were it delivered,
//!   would add `x-pw-grpc-reply` and resume early (`grpc-call`'s callback).
//!   Paths containing `/inflight` send message `slow` (the server holds it 5 s)
//!   and cancel it only in the HTTP call's callback, recording that result.
//!
//! - `grpc-stream`: gRPC streams to `legate.test.v1.Echo/Count` on cluster
//!   `grpc`, opened by the root context. `/stream/<key>/<scenario>` enqueues the
//!   scenario to queue `pw_streams`; the root context's `on_queue_ready` opens
//!   the stream and records what it gets in shared data `pw_stream_<key>`
//!   (`open;init:<:status>:<content-type>;msg:<n>;...;trail:<grpc-status>;close:<code>:<message>`),
//!   which `/result/<key>` answers as header `x-pw-stream`. Scenarios:
//!   `count/<n>/<delay_ms>` (the request sent with `end_stream`),
//!   `fail/<code>` (two replies, then status `code`), `close/<n>` (the request
//!   sent without `end_stream`, then `proxy_grpc_close`: the server answers
//!   only once the request side ended), `cancel` (cancels on the first reply;
//!   records `cancel:<result>,<second cancel>,<send after>`), `dead` (cluster
//!   `dead`), `chat/<n>` (bidirectional `Echo/Chat`: sends `m1`, and on each
//!   echoed reply the next one, until `m<n>` came back; then half-closes;
//!   replies are recorded as `msg:<text>`), `cap` (opens streams until one is
//!   refused, cancels them all, records `cap:<opened>:<error>;after:`), `trap`
//!   (a slow `Count` whose first reply makes the guest panic).
//!   `/direct/unknown` answers `x-pw-unknown: <send>,<close>,<cancel>` for
//!   token 999999; `/direct/ungranted` answers `x-pw-open:` the result of
//!   opening a stream to `backend`, which is not granted; `/direct/leave`
//!   opens a slow `Count` stream from the HTTP context and answers at once.
//!   Requests that pause on a stream of their own HTTP context (Envoy's
//!   ext_proc shape): `/await/<word>` opens `Echo/Chat`, sends `<word>` and
//!   pauses; the echoed reply sets request header `x-pw-stream-verdict` and
//!   resumes, or, for `deny`, answers 403. `/await-count/<n>` streams `n`
//!   `Count` replies 50 ms apart and resumes after the last with
//!   `x-pw-stream-seen: 1,2,…`; with `/resume-on-close` it resumes in the
//!   close callback with `x-pw-stream-close: <status>`; with `/never` it
//!   never resumes. `/await-body` (with `allow_on_headers_stop_iteration`)
//!   keeps a `Chat` stream open while the body
//!   is buffered, sends the body on it from the body callback and pauses; the
//!   reply `<text>` makes the body `stream:<text>`. `/await-late` pauses on a
//!   unary `Say` call whose callback opens the stream (`late`) that resumes;
//!   `/await-cancel` opens a slow `Count` stream and a `Say` call whose
//!   callback cancels the stream and stays paused.
//!
//! TCP (network filter) modes, a `StreamContext` per connection; each counts
//! its callbacks in metrics `pw_tcp_new`, `pw_tcp_down_close_{remote,local}`,
//! `pw_tcp_up_close_{remote,local}` and `pw_tcp_log`:
//!
//! - `tcp-rewrite`: downstream data is held (`Pause`) until it ends with a
//!   newline (or the stream ends), then every `hello` becomes `howdy, partner`
//!   and a line `props` becomes `src=<source.address> dst=<destination.address>
//!   up=<upstream.address> tls=<connection.tls_version or none> req=<request.path
//!   or none>`; upstream data
//!   has every `o` replaced by `0`.
//! - `tcp-close`: downstream data containing `QUIT` closes the connection
//!   (`close_downstream`), upstream data containing `BYE` too
//!   (`close_upstream`); anything else passes.
//! - `tcp-callout`: `on_new_connection` calls cluster `authz` at the config's
//!   `path` and pauses; a 200 resumes (`resume_downstream`) and prefixes the
//!   first downstream data with the answer's body and `|`, anything else closes.
//! - `tcp-trap`: downstream data containing `boom` panics.
//! - `tcp-resume`: the first data of each direction calls cluster `authz` at
//!   `path` and pauses; each call's response resumes its own direction
//!   (`resume_downstream` / `resume_upstream`). `tcp-resume-down`: every
//!   response calls `resume_downstream` only. `tcp-resume-edit`: as
//!   `tcp-resume`, and each response first prefixes the data its direction
//!   holds with `down|` or `up|` (`set_downstream_data` / `set_upstream_data`
//!   in the callback).
//! - `tcp-footer`: downstream data passes; at its end the filter calls
//!   cluster `authz` at `path` and pauses, and the call's callback appends
//!   `[footer]\n` to the downstream data it holds (`set_downstream_data`
//!   with a start past the end: maybe only the end of the stream is held)
//!   and resumes it.
//! - `tcp-hold`: downstream data is always held (`Pause`, nothing
//!   outstanding): the connection ends at the plugin's `limits.pause` or
//!   `limits.body`.
//! - `tcp-lines`: data of either direction is held (`Pause`) until it ends
//!   with a newline (or the stream ends), then passes unchanged.
//! - `tcp-tick`: pauses with nothing outstanding that the root context's tick
//!   (every `tick_ms`, default 20) ends, as `tick-resume` does for HTTP:
//!   downstream data is held (`Pause`, called again with all of it) until it
//!   ends with a newline (or the stream ends); then the connection waits for
//!   the tick (still `Pause` for data that arrives meanwhile), which makes
//!   it effective and resumes it (`resume_downstream`), or closes it
//!   (`close_downstream`) if the line starts with `close`; a line starting
//!   with `never` is never resumed. Once resumed, data passes. With `new:
//!   true`, `on_new_connection` pauses instead and the tick resumes it
//!   (downstream data then passes; with `never: true` too, nothing resumes
//!   it); with `up: true`, the first upstream line
//!   waits the same way and the tick resumes it (`resume_upstream`). Tick
//!   hostcalls that fail count in `pw_tick_errors`, contexts acted on in
//!   `pw_tick_acted`.
//!
//! - `share` (VM sharing, `tag` from the config): a static counter of the module
//!   (one per VM, so only a shared VM shows another plugin's increments) is
//!   incremented per request and echoed as `x-pw-count-<tag>`; the response also
//!   carries `x-pw-cfg-<tag>` (the tag read in `on_configure`), `x-pw-root-<tag>`
//!   (`plugin_root_id` read in `on_configure`) and `x-pw-root-now-<tag>` (read in
//!   the HTTP context). `/trap/<tag>` panics in that plugin's context. Ticks
//!   (`tick_ms`) count in metric `pw_share_ticks` of the ticking plugin. With
//!   `vm_config: vm-metric`, `on_vm_start` defines counter `pw_vm_requests`
//!   (once per VM) and each request increments it, the result as
//!   `x-pw-vm-metric-<tag>`.
//!
//! - `logger`: only logs: `on_log` counts metric
//!   `pw_logged_<response.code>_<response.code_details>` (as `close` and
//!   `late-call` do), whether or not the exchange reached its other callbacks.
//!
//! - `late-call`: a call whose result comes while the exchange is not
//!   paused. `/late/http` sends an HTTP call to `authz` and `/late/grpc` a
//!   unary `Echo/Say` call on cluster `grpc` from the request headers
//!   callback, `/late/response` an HTTP call to `authz` from the response
//!   headers callback; each callback returns `Continue`. The call's callback
//!   counts in metric `pw_late_calls` and sets request header `x-pw-late`
//!   (the head went on: the write must be accepted and go nowhere), and
//!   `on_log` counts in `pw_late_logged` if the callback ran before it.
//!   Held heads (Envoy's StopIteration): `/late/held…` returns `Pause` from
//!   the request headers callback with no call out (the head is held while
//!   the body streams through the body callback), and the first request body
//!   call sends the HTTP call and returns `Pause`, as do later ones until
//!   the end of stream, which continues; `/late/held-resp` does the same on
//!   the response (the request goes on). The call's callback, run between
//!   chunks, sets header `x-pw-held-write: call` on that held head
//!   (`/late/held`, `/late/held-resp`) or answers 403 `x-pw-late-denied:
//!   yes` (`/late/held-deny`, `/late/held-resp-deny`; `/late/deny` does so
//!   for a call sent from the request headers callback, which returns
//!   `Continue`). `/late/trap`: as `/late/http`, but the call's callback
//!   panics (the VM traps between phases). `/late/response-deny` sends its
//!   call as `/late/response` does and answers 403 from the callback, with
//!   details `late_denied` (after the response head went out: the stream
//!   must be reset). `on_log` records what it sees as `close` mode does.
//! - `wrong-resume`: `/req…` pauses the request headers callback,
//!   `/resp…` the response headers callback, on an HTTP call to `authz`. The
//!   call's callback continues the other direction (`resume_http_response`
//!   for `/req`, `resume_http_request` for `/resp`: nothing to resume there)
//!   and sends a second call, whose callback sets header `x-pw-resumed-by:
//!   second` on the held head and continues the right direction.
//!
//! - `tick-resume` (a pause another callback of the VM resumes, as Envoy
//!   allows: a filter that lets waiting requests through at a rate, or waits
//!   for configuration the root context fetches): the root context ticks
//!   every `tick_ms` (default 20) and, on each tick, takes every waiting
//!   context (kept in the VM: each worker's VM has its own), makes it
//!   effective (`set_effective_context`) and acts on it. `/wait/resume…`
//!   pauses the request headers callback (nothing outstanding) and the tick
//!   resumes it (`resume_http_request`); `/wait/local…` is answered 429 by
//!   the tick (`x-pw-tick: local`, body `answered by the tick`);
//!   `/wait/close…` is reset by the tick (`reset_http_request`);
//!   `/wait/never…` is never resumed. `/wait/response…` goes upstream, and
//!   its response headers callback sets `x-pw-waited: response` and pauses
//!   (waiting for the body), the body callback holds every chunk and pauses
//!   at the end with nothing outstanding; the tick resumes the response
//!   (`resume_http_response`). `/wait/body…`
//!   (with a body) holds the
//!   head for the body (`Pause` from the headers callback), holds every
//!   chunk, and at the end of the body upper-cases it and pauses with
//!   nothing outstanding; the tick resumes it. A hostcall the tick makes
//!   that fails counts in metric `pw_tick_errors`; each context a tick
//!   acted on, in `pw_tick_acted`. `/wait/held-response…` goes upstream and
//!   its response headers callback sets `x-pw-waited: held` and pauses for
//!   the tick (which resumes it), body to come or not. A body callback (either
//!   direction) of a context still waiting for the tick counts in
//!   `pw_tick_early_body`.
//! - `tick-change`: the root context ticks every `tick_ms` (default 60000),
//!   counting in `pw_changed_ticks`; a request to `/tick/<ms>` sets the period
//!   to `<ms>` (0: stop) from its HTTP context (`set_tick_period`, the root
//!   context's timer, as in Envoy) and is answered 200 with `x-pw-tick-set:
//!   <result>`.
//! - `order`: `on_log` counts in `pw_log_before_done` if `on_done` has not
//!   been called for its context yet, else in `pw_log_after_done`.
//!
//! - `empty` (the mode of a plugin with no plugin configuration: the SDK's
//!   `get_plugin_configuration` gives `None`, as in Envoy): the response
//!   carries what getters gave for empty values, as `none` or `some:<text>`:
//!   `x-pw-plugin-config`, `x-pw-vm-config-seen` (as `on_vm_start` saw it),
//!   `x-pw-empty-header` (request header `x-empty`), `x-pw-empty-shared`
//!   (shared data `pw_empty`, just set to no bytes); on the first request
//!   body call with data, `x-pw-body-zero` (zero bytes from 0),
//!   `x-pw-body-past` (bytes from the end) and `x-pw-body-first` (the chunk).
//!
//! The VM configuration, if any, is echoed as `x-pw-vm-config`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// `share` mode's counter: one per VM (module instance).
static SHARED_COUNT: AtomicU64 = AtomicU64::new(0);

/// With `vm_config: vm-metric`: counter `pw_vm_requests`, defined in
/// `on_vm_start` (once per VM, on its first root context).
static VM_METRIC: AtomicU32 = AtomicU32::new(0);

std::thread_local! {
    /// `tick-resume`: the HTTP contexts of this VM waiting for a tick, with
    /// what the tick does to each (`resume`, `local`, `close`); `tcp-tick`:
    /// its TCP contexts (`tcp-resume`, `tcp-close`, `tcp-up`).
    static WAITING: std::cell::RefCell<Vec<(u32, &'static str)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root::default())
    });
}}

#[derive(Default, Clone)]
struct Settings {
    mode: String,
    greeting: String,
    vm_config: String,
    /// What `get_vm_configuration` and `get_plugin_configuration` gave
    /// (`none`, or `some:<text>`), for the `empty` mode.
    vm_config_seen: String,
    plugin_config_seen: String,
    requests_metric: u32,
    ticks_metric: u32,
    /// `counter` mode: a counter each request adds 2 to with `record_metric`.
    recorded_metric: u32,
    /// `counter` mode: a histogram each request records 7 and 2000 on.
    histogram_metric: u32,
    /// `late-call` mode: `pw_late_calls` and `pw_late_logged`.
    late_metrics: [u32; 2],
    /// `queue` mode: items each request enqueues (`burst`); if set,
    /// `on_queue_ready` dequeues one item per call.
    burst: u64,
    queue: u32,
    /// `queue` mode: the `vm_id` whose queue `pw_events` requests enqueue to
    /// (`target_vm`; default: the plugin's own).
    target_vm: String,
    /// `tick-resume`: counter `pw_tick_early_body` (a body callback of a
    /// context still waiting for the tick).
    early_metric: u32,
    timeout_ms: u64,
    /// `callout` mode: the cluster called (`cluster`, default `authz`).
    cluster: String,
    /// `path` (the TCP callout's).
    path: String,
    /// `share` mode: the config's `tag` and `plugin_root_id` as `on_configure` saw it.
    tag: String,
    root_id: String,
    /// The TCP metrics: new, down close remote/local, up close remote/local, log.
    tcp: [u32; 6],
    /// `tcp-tick`: the new connection waits for the tick (`new`), instead of
    /// the first downstream line; the first upstream line waits too (`up`).
    tick_new: bool,
    tick_up: bool,
    /// `tcp-tick` with `new: true, never: true`: the new connection's pause
    /// is never resumed.
    tick_never: bool,
}

#[derive(Default)]
struct Root {
    s: Settings,
    ticks: u64,
    /// gRPC streams: token → (record key, scenario).
    streams: HashMap<u32, (String, String)>,
}

/// `none`, or `some:<the bytes as text>`: what a getter gave (`empty` mode).
fn seen(v: Option<&[u8]>) -> String {
    v.map_or("none".into(), |b| {
        format!("some:{}", String::from_utf8_lossy(b))
    })
}

/// A protobuf varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A `CountRequest { from: 1, count, fail_code, fail_message, delay_ms }`.
fn count_request(count: u64, fail_code: u64, fail_message: &str, delay_ms: u64) -> Vec<u8> {
    let mut m = vec![0x08, 1, 0x10];
    varint(count, &mut m);
    if fail_code != 0 {
        m.push(0x18);
        varint(fail_code, &mut m);
        m.push(0x22);
        varint(fail_message.len() as u64, &mut m);
        m.extend_from_slice(fail_message.as_bytes());
    }
    if delay_ms != 0 {
        m.push(0x28);
        varint(delay_ms, &mut m);
    }
    m
}

/// A `SayRequest { message }`.
fn say_request(message: &str) -> Vec<u8> {
    let mut m = vec![0x0a];
    varint(message.len() as u64, &mut m);
    m.extend_from_slice(message.as_bytes());
    m
}

impl Root {
    /// Appends `item` to the record of stream `token`.
    fn record(&self, token: u32, item: &str) {
        let Some((key, _)) = self.streams.get(&token) else {
            return;
        };
        let key = format!("pw_stream_{key}");
        let (cur, _) = self.get_shared_data(&key);
        let mut v = cur
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if !v.is_empty() {
            v.push(';');
        }
        v.push_str(item);
        self.set_shared_data(&key, Some(v.as_bytes()), None).ok();
    }

    /// Opens the stream `scenario` asks for, recorded under `key`.
    fn start_stream(&mut self, key: &str, scenario: &str) {
        if scenario == "cap" {
            let mut open = Vec::new();
            let mut error = String::new();
            for _ in 0..100 {
                match hostcalls::open_grpc_stream("grpc", "legate.test.v1.Echo", "Count", vec![]) {
                    Ok(t) => open.push(t),
                    Err(e) => {
                        error = format!("{e:?}");
                        break;
                    }
                }
            }
            for t in &open {
                hostcalls::cancel_grpc_stream(*t).ok();
            }
            let k = format!("pw_stream_{key}");
            let v = format!("cap:{}:{error};after:", open.len());
            self.set_shared_data(&k, Some(v.as_bytes()), None).ok();
            return;
        }
        let parts: Vec<&str> = scenario.split('/').collect();
        let num = |i: usize, d: u64| {
            parts
                .get(i)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(d)
        };
        let cluster = if parts[0] == "dead" { "dead" } else { "grpc" };
        let method = if parts[0] == "chat" { "Chat" } else { "Count" };
        let r = hostcalls::open_grpc_stream(
            cluster,
            "legate.test.v1.Echo",
            method,
            vec![("x-pw-md", b"from-a-stream")],
        );
        let token = match r {
            Ok(t) => t,
            Err(e) => {
                let k = format!("pw_stream_{key}");
                self.set_shared_data(&k, Some(format!("open-error:{e:?}").as_bytes()), None)
                    .ok();
                return;
            }
        };
        self.streams
            .insert(token, (key.to_string(), scenario.to_string()));
        self.record(token, "open");
        let (message, end) = match parts[0] {
            "count" => (count_request(num(1, 3), 0, "", num(2, 0)), true),
            "fail" => (
                count_request(2, num(1, 2), "stream failed on purpose", 0),
                true,
            ),
            "close" => (count_request(num(1, 2), 0, "", 0), false),
            "cancel" => (count_request(5, 0, "", 200), true),
            "trap" => (count_request(5, 0, "", 200), true),
            "chat" => (say_request("m1"), false),
            _ => (count_request(1, 0, "", 0), true),
        };
        let sent = hostcalls::send_grpc_stream_message(token, Some(&message), end);
        if sent.is_err() {
            self.record(token, &format!("send-error:{sent:?}"));
        }
        if parts[0] == "close" {
            // Half-close: the server (which waits for the end of the request)
            // answers, and the callbacks go on.
            let c = hostcalls::close_grpc_stream(token);
            self.record(token, &format!("closed:{c:?}"));
        }
    }
}

/// `root-done`: the root context's end, as Envoy's teardown of a plugin
/// (`proxy_on_delete` drops it).
impl Drop for Root {
    fn drop(&mut self) {
        if self.s.mode == "root-done" {
            bump("pw_root_deleted");
        }
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        if self.s.mode == "root-done" {
            bump(&format!("pw_root_done_{}", self.s.tag));
            if self.s.tag == "trap" {
                panic!("on_done traps");
            }
        }
        true
    }

    fn on_grpc_stream_initial_metadata(&mut self, token: u32, _n: u32) {
        let ct = self
            .get_grpc_stream_initial_metadata_value("content-type")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let status = self
            .get_grpc_stream_initial_metadata_value(":status")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.record(token, &format!("init:{status}:{ct}"));
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let m = self.get_grpc_stream_message(0, size).unwrap_or_default();
        let chat = self
            .streams
            .get(&token)
            .and_then(|(_, s)| s.strip_prefix("chat/"))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(last) = chat {
            // SayReply: field 1 (message) first.
            let text = match m.as_slice() {
                [0x0a, n, rest @ ..] if usize::from(*n) <= rest.len() => {
                    String::from_utf8_lossy(&rest[..usize::from(*n)]).into_owned()
                }
                _ => "<undecodable>".to_string(),
            };
            self.record(token, &format!("msg:{text}"));
            let i = text.trim_start_matches('m').parse::<u32>().unwrap_or(last);
            if i < last {
                let next = say_request(&format!("m{}", i + 1));
                let r = hostcalls::send_grpc_stream_message(token, Some(&next), false);
                if r.is_err() {
                    self.record(token, &format!("send-error:{r:?}"));
                }
            } else {
                let c = hostcalls::close_grpc_stream(token);
                self.record(token, &format!("closed:{c:?}"));
            }
            return;
        }
        let n = match m.as_slice() {
            [] => 0,
            [0x08, v] => u64::from(*v),
            _ => 9999,
        };
        self.record(token, &format!("msg:{n}"));
        if self.streams.get(&token).is_some_and(|(_, s)| s == "trap") {
            panic!("guest panic in a gRPC stream callback, on purpose");
        }
        let cancel = self.streams.get(&token).is_some_and(|(_, s)| s == "cancel");
        if cancel {
            let a = hostcalls::cancel_grpc_stream(token);
            let b = hostcalls::cancel_grpc_stream(token);
            let c = hostcalls::send_grpc_stream_message(token, Some(b"x"), false);
            self.record(token, &format!("cancel:{a:?},{b:?},{c:?}"));
        }
    }

    fn on_grpc_stream_trailing_metadata(&mut self, token: u32, _n: u32) {
        let st = self
            .get_grpc_stream_trailing_metadata_value("grpc-status")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.record(token, &format!("trail:{st}"));
    }

    fn on_grpc_stream_close(&mut self, token: u32, status: u32) {
        let (code, message) = self.get_grpc_status();
        let message = message.unwrap_or_default();
        self.record(token, &format!("close:{status}/{code}:{message}"));
        // Closing after the server closed is OK, as in Envoy (the SDK's
        // wrapper unwraps it).
        let c = hostcalls::close_grpc_stream(token);
        self.record(token, &format!("after:{c:?}"));
        self.streams.remove(&token);
    }

    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let body = self
            .get_http_call_response_body(0, usize::MAX)
            .unwrap_or_default();
        self.set_shared_data("pw_tick_body", Some(&body), None).ok();
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let vm_config = self.get_vm_configuration();
        self.s.vm_config_seen = seen(vm_config.as_deref());
        if let Some(b) = vm_config {
            self.s.vm_config = String::from_utf8_lossy(&b).into_owned();
        }
        if self.s.vm_config == "vm-metric" {
            // Defined once per VM, used by every plugin's contexts in it.
            let id = hostcalls::define_metric(MetricType::Counter, "pw_vm_requests").unwrap_or(0);
            VM_METRIC.store(id, Ordering::Relaxed);
        }
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            // None (Envoy's answer for no configuration): the `empty` mode.
            self.s.plugin_config_seen = "none".into();
            self.s.mode = "empty".into();
            return true;
        };
        self.s.plugin_config_seen = seen(Some(&bytes));
        let v: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("bad config: {e}")).ok();
                return false;
            }
        };
        self.s.mode = v["mode"].as_str().unwrap_or("headers").to_string();
        self.s.greeting = v["greeting"].as_str().unwrap_or("hello").to_string();
        if self.s.mode == "reject" {
            return false;
        }
        if let Some(ms) = v["configure_spin_ms"].as_u64() {
            // A filter whose start takes CPU (a large rule set to compile).
            let until = std::time::Instant::now() + Duration::from_millis(ms);
            let mut x = 0u64;
            while std::time::Instant::now() < until {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            std::hint::black_box(x);
        }
        if let Some(mib) = v["configure_alloc_mib"].as_u64() {
            // A filter that needs memory to start (a rule set to compile).
            let v = vec![1u8; (mib as usize) << 20];
            std::hint::black_box(&v);
        }
        if self.s.mode == "grpc-stream" {
            self.s.queue = self.register_shared_queue("pw_streams");
        }
        if self.s.mode == "queue" {
            self.s.queue = self.register_shared_queue("pw_events");
            self.s.requests_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_dequeued").unwrap_or(0);
        }
        self.s.timeout_ms = v["timeout_ms"].as_u64().unwrap_or(1000);
        self.s.cluster = v["cluster"].as_str().unwrap_or("authz").to_string();
        self.s.burst = v["burst"].as_u64().unwrap_or(0);
        self.s.target_vm = v["target_vm"].as_str().unwrap_or_default().to_string();
        if self.s.mode == "tick-change" {
            self.s.ticks_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_changed_ticks").unwrap_or(0);
            let ms = v["tick_ms"].as_u64().unwrap_or(60_000);
            self.set_tick_period(Duration::from_millis(ms));
        }
        if self.s.mode == "order" {
            for n in ["pw_log_before_done", "pw_log_after_done"] {
                hostcalls::define_metric(MetricType::Counter, n).ok();
            }
        }
        self.s.path = v["path"].as_str().unwrap_or("/check").to_string();
        if self.s.mode.starts_with("tcp-") {
            let names = [
                "pw_tcp_new",
                "pw_tcp_down_close_remote",
                "pw_tcp_down_close_local",
                "pw_tcp_up_close_remote",
                "pw_tcp_up_close_local",
                "pw_tcp_log",
            ];
            for (i, n) in names.iter().enumerate() {
                self.s.tcp[i] = hostcalls::define_metric(MetricType::Counter, n).unwrap_or(0);
            }
        }
        if self.s.mode == "late-call" {
            for (i, n) in ["pw_late_calls", "pw_late_logged"].iter().enumerate() {
                self.s.late_metrics[i] =
                    hostcalls::define_metric(MetricType::Counter, n).unwrap_or(0);
            }
        }
        if self.s.mode == "tick-callout" {
            if let Some(ms) = v["tick_ms"].as_u64() {
                self.set_tick_period(Duration::from_millis(ms));
            }
        }
        if self.s.mode == "tcp-tick" {
            self.s.tick_new = v["new"].as_bool().unwrap_or(false);
            self.s.tick_up = v["up"].as_bool().unwrap_or(false);
            self.s.tick_never = v["never"].as_bool().unwrap_or(false);
        }
        if self.s.mode == "tick-resume" || self.s.mode == "tcp-tick" {
            self.s.ticks_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_tick_errors").unwrap_or(0);
            self.s.requests_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_tick_acted").unwrap_or(0);
            self.s.early_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_tick_early_body").unwrap_or(0);
            let ms = v["tick_ms"].as_u64().unwrap_or(20);
            self.set_tick_period(Duration::from_millis(ms));
        }
        if self.s.mode == "filter-state" {
            self.s.tag = v["tag"].as_str().unwrap_or("none").to_string();
        }
        if self.s.mode == "root-done" {
            self.s.tag = v["tag"].as_str().unwrap_or("none").to_string();
            // Ticking makes each worker start this VM with the config.
            self.set_tick_period(Duration::from_millis(50));
        }
        if self.s.mode == "share" {
            self.s.tag = v["tag"].as_str().unwrap_or("none").to_string();
            self.s.root_id = prop(self, &["plugin_root_id"]);
            self.s.ticks_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_share_ticks").unwrap_or(0);
            if let Some(ms) = v["tick_ms"].as_u64() {
                self.set_tick_period(Duration::from_millis(ms));
            }
        }
        if self.s.mode == "counter" {
            self.s.requests_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_requests").unwrap_or(0);
            self.s.ticks_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_ticks").unwrap_or(0);
            let g = hostcalls::define_metric(MetricType::Gauge, "pw_gauge").unwrap_or(0);
            hostcalls::record_metric(g, 42).ok();
            self.s.recorded_metric =
                hostcalls::define_metric(MetricType::Counter, "pw_recorded").unwrap_or(0);
            self.s.histogram_metric =
                hostcalls::define_metric(MetricType::Histogram, "pw_histogram").unwrap_or(0);
            if let Some(ms) = v["tick_ms"].as_u64() {
                self.set_tick_period(Duration::from_millis(ms));
            }
        }
        true
    }

    fn on_tick(&mut self) {
        if self.s.mode == "root-done" {
            return;
        }
        if self.s.mode == "tick-change" {
            hostcalls::increment_metric(self.s.ticks_metric, 1).ok();
            return;
        }
        if self.s.mode == "tick-resume" || self.s.mode == "tcp-tick" {
            let waiting = WAITING.with(|w| std::mem::take(&mut *w.borrow_mut()));
            for (id, what) in waiting {
                let r = hostcalls::set_effective_context(id).and_then(|()| match what {
                    "tcp-resume" => hostcalls::resume_downstream(),
                    "tcp-close" => hostcalls::close_downstream(),
                    "tcp-up" => hostcalls::resume_upstream(),
                    "local" => hostcalls::send_http_response(
                        429,
                        vec![("x-pw-tick", "local"), ("content-type", "text/plain")],
                        Some(b"answered by the tick"),
                    ),
                    "close" => hostcalls::reset_http_request(),
                    "response" => hostcalls::resume_http_response(),
                    _ => hostcalls::resume_http_request(),
                });
                if r.is_err() {
                    hostcalls::increment_metric(self.s.ticks_metric, 1).ok();
                }
                hostcalls::increment_metric(self.s.requests_metric, 1).ok();
            }
            return;
        }
        if self.s.mode == "tick-callout" {
            let r = self.dispatch_http_call(
                "authz",
                vec![
                    (":method", "GET"),
                    (":path", "/tick"),
                    (":authority", "authz"),
                ],
                None,
                vec![],
                Duration::from_millis(self.s.timeout_ms),
            );
            if let Err(e) = r {
                proxy_wasm::hostcalls::log(LogLevel::Warn, &format!("tick call: {e:?}")).ok();
            }
            return;
        }
        self.ticks += 1;
        hostcalls::increment_metric(self.s.ticks_metric, 1).ok();
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("tick {}", self.ticks)).ok();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if self.s.mode == "grpc-stream" {
            while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
                let item = String::from_utf8_lossy(&item).into_owned();
                if let Some((key, scenario)) = item.split_once(' ') {
                    self.start_stream(key, scenario);
                }
            }
            return;
        }
        if self.s.mode != "queue" {
            return;
        }
        if self.s.burst > 0 {
            // One item per call: each enqueue owes a call.
            if let Ok(Some(_item)) = self.dequeue_shared_queue(queue_id) {
                hostcalls::increment_metric(self.s.requests_metric, 1).ok();
            }
            return;
        }
        while let Ok(Some(_item)) = self.dequeue_shared_queue(queue_id) {
            hostcalls::increment_metric(self.s.requests_metric, 1).ok();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter {
            id: context_id,
            s: self.s.clone(),
            seen: Vec::new(),
            body_calls: 0,
            path: String::new(),
            held: Held::None,
            held_len: 0,
            grpc_token: None,
            stream_seen: Vec::new(),
            calls: 0,
            resp_body_calls: 0,
            trace: String::new(),
            done: false,
        }))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Tcp {
            id: context_id,
            s: self.s.clone(),
            prefix: None,
            calls: [None, None],
            ticked: [Tick::No, Tick::No],
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        if self.s.mode.starts_with("tcp-") {
            Some(ContextType::StreamContext)
        } else {
            Some(ContextType::HttpContext)
        }
    }
}

/// Where a `tcp-tick` direction is.
#[derive(Clone, Copy, PartialEq)]
enum Tick {
    /// Not waiting for the tick yet (holding a partial line).
    No,
    /// Waiting for the tick (or, once it acted, resumed).
    Waits,
    /// Waiting for nothing (`never`).
    Never,
}

/// A TCP connection's context (the `tcp-*` modes).
struct Tcp {
    id: u32,
    s: Settings,
    /// `tcp-tick`: each direction's wait (downstream, upstream).
    ticked: [Tick; 2],
    /// `tcp-callout`: the authorization answer, prefixed to the next downstream data.
    prefix: Option<Vec<u8>>,
    /// `tcp-resume*`: the call each direction made (downstream, upstream), if any.
    calls: [Option<u32>; 2],
}

impl Tcp {
    fn count(&self, i: usize) {
        hostcalls::increment_metric(self.s.tcp[i], 1).ok();
    }

    fn property(&self, path: &str) -> String {
        let segs: Vec<&str> = path.split('.').collect();
        self.get_property(segs)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_else(|| "none".to_string())
    }
}

fn replace_all(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

impl Tcp {
    /// `tcp-tick`: direction `i`'s data waits for the tick (see the module
    /// docs).
    fn tick_hold(&mut self, size: usize, end_of_stream: bool, i: usize) -> Action {
        if (i == 0 && self.s.tick_new) || (i == 1 && !self.s.tick_up) {
            return Action::Continue;
        }
        let up = i == 1;
        match self.ticked[i] {
            Tick::Never => return Action::Pause,
            Tick::Waits => {
                // Still in the tick's list: still waiting.
                let id = self.id;
                let waits = WAITING.with(|w| {
                    w.borrow()
                        .iter()
                        .any(|(c, what)| *c == id && (*what == "tcp-up") == up)
                });
                return if waits {
                    Action::Pause
                } else {
                    Action::Continue
                };
            }
            Tick::No => {}
        }
        let data = if up {
            self.get_upstream_data(0, size)
        } else {
            self.get_downstream_data(0, size)
        }
        .unwrap_or_default();
        if !end_of_stream && !data.ends_with(b"\n") {
            return Action::Pause;
        }
        let what = if up {
            "tcp-up"
        } else if data.starts_with(b"close") {
            "tcp-close"
        } else if data.starts_with(b"never") {
            self.ticked[i] = Tick::Never;
            return Action::Pause;
        } else {
            "tcp-resume"
        };
        self.ticked[i] = Tick::Waits;
        let id = self.id;
        WAITING.with(|w| w.borrow_mut().push((id, what)));
        Action::Pause
    }

    /// `tcp-lines`: holds direction `i`'s data until a newline ends it.
    fn line(&self, size: usize, end_of_stream: bool, i: usize) -> Action {
        let data = if i == 0 {
            self.get_downstream_data(0, size)
        } else {
            self.get_upstream_data(0, size)
        };
        if end_of_stream || data.unwrap_or_default().ends_with(b"\n") {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    /// `tcp-resume*`: the first data of direction `i` calls `authz` and pauses.
    fn hold_once(&mut self, i: usize) -> Action {
        if !self.s.mode.starts_with("tcp-resume") || self.calls[i].is_some() {
            return Action::Continue;
        }
        let path = self.s.path.clone();
        let call = self.dispatch_http_call(
            "authz",
            vec![
                (":method", "GET"),
                (":path", &path),
                (":authority", "authz"),
            ],
            None,
            vec![],
            Duration::from_millis(self.s.timeout_ms),
        );
        match call {
            Ok(token) => {
                self.calls[i] = Some(token);
                Action::Pause
            }
            Err(_) => Action::Continue,
        }
    }
}

impl Context for Tcp {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _trailers: usize) {
        if self.s.mode == "tcp-footer" {
            // Appends (a start past the end) to what the filter holds: at
            // least the end of the stream, maybe nothing else.
            self.set_downstream_data(usize::MAX / 2, 0, b"[footer]\n");
            self.resume_downstream();
            return;
        }
        if self.s.mode == "tcp-resume-down" {
            self.resume_downstream();
            return;
        }
        if self.s.mode.starts_with("tcp-resume") {
            let edit = self.s.mode == "tcp-resume-edit";
            if self.calls[1] == Some(token) {
                if edit {
                    self.set_upstream_data(0, 0, b"up|");
                }
                self.resume_upstream();
            } else {
                if edit {
                    self.set_downstream_data(0, 0, b"down|");
                }
                self.resume_downstream();
            }
            return;
        }
        let status = self.get_http_call_response_header(":status");
        if headers > 0 && status.as_deref() == Some("200") {
            self.prefix = Some(
                self.get_http_call_response_body(0, body)
                    .unwrap_or_default(),
            );
            self.resume_downstream();
        } else {
            self.close_downstream();
        }
    }

    fn on_done(&mut self) -> bool {
        true
    }
}

impl StreamContext for Tcp {
    fn on_new_connection(&mut self) -> Action {
        self.count(0);
        if self.s.mode == "tcp-tick" && self.s.tick_new {
            if !self.s.tick_never {
                let id = self.id;
                WAITING.with(|w| w.borrow_mut().push((id, "tcp-resume")));
            }
            return Action::Pause;
        }
        if self.s.mode != "tcp-callout" {
            return Action::Continue;
        }
        let path = self.s.path.clone();
        match self.dispatch_http_call(
            "authz",
            vec![
                (":method", "GET"),
                (":path", &path),
                (":authority", "authz"),
            ],
            None,
            vec![],
            Duration::from_millis(self.s.timeout_ms),
        ) {
            Ok(_) => Action::Pause,
            Err(_) => {
                self.close_downstream();
                Action::Continue
            }
        }
    }

    fn on_downstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.s.mode == "tcp-footer" {
            if !end_of_stream {
                return Action::Continue;
            }
            let path = self.s.path.clone();
            return match self.dispatch_http_call(
                "authz",
                vec![
                    (":method", "GET"),
                    (":path", &path),
                    (":authority", "authz"),
                ],
                None,
                vec![],
                Duration::from_millis(self.s.timeout_ms),
            ) {
                Ok(_) => Action::Pause,
                Err(_) => Action::Continue,
            };
        }
        if self.s.mode == "tcp-hold" {
            return Action::Pause;
        }
        if self.s.mode.starts_with("tcp-resume") {
            return self.hold_once(0);
        }
        if self.s.mode == "tcp-tick" {
            return self.tick_hold(size, end_of_stream, 0);
        }
        if self.s.mode == "tcp-lines" {
            return self.line(size, end_of_stream, 0);
        }
        let data = self.get_downstream_data(0, size).unwrap_or_default();
        match self.s.mode.as_str() {
            "tcp-rewrite" => {
                if !end_of_stream && !data.ends_with(b"\n") {
                    return Action::Pause;
                }
                let mut out = replace_all(&data, b"hello", b"howdy, partner");
                if out.windows(6).any(|w| w == b"props\n") {
                    let line = format!(
                        "src={} dst={} up={} tls={} req={}\n",
                        self.property("source.address"),
                        self.property("destination.address"),
                        self.property("upstream.address"),
                        self.property("connection.tls_version"),
                        self.property("request.path"),
                    );
                    out = replace_all(&out, b"props\n", line.as_bytes());
                }
                self.set_downstream_data(0, size, &out);
            }
            "tcp-close" if data.windows(4).any(|w| w == b"QUIT") => {
                self.close_downstream();
            }
            "tcp-callout" => {
                if let Some(mut p) = self.prefix.take() {
                    p.push(b'|');
                    self.set_downstream_data(0, 0, &p);
                }
            }
            "tcp-trap" if data.windows(4).any(|w| w == b"boom") => {
                panic!("boom in on_downstream_data");
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.s.mode.starts_with("tcp-resume") {
            return self.hold_once(1);
        }
        if self.s.mode == "tcp-tick" {
            return self.tick_hold(size, end_of_stream, 1);
        }
        if self.s.mode == "tcp-lines" {
            return self.line(size, end_of_stream, 1);
        }
        let data = self.get_upstream_data(0, size).unwrap_or_default();
        match self.s.mode.as_str() {
            "tcp-rewrite" => {
                let out: Vec<u8> = data
                    .iter()
                    .map(|b| if *b == b'o' { b'0' } else { *b })
                    .collect();
                self.set_upstream_data(0, size, &out);
            }
            "tcp-close" if data.windows(3).any(|w| w == b"BYE") => {
                self.close_upstream();
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_downstream_close(&mut self, peer: PeerType) {
        self.count(if matches!(peer, PeerType::Remote) {
            1
        } else {
            2
        });
    }

    fn on_upstream_close(&mut self, peer: PeerType) {
        self.count(if matches!(peer, PeerType::Remote) {
            3
        } else {
            4
        });
    }

    fn on_log(&mut self) {
        self.count(5);
    }
}

struct Filter {
    id: u32,
    s: Settings,
    /// Response headers to add, gathered in earlier phases.
    seen: Vec<(String, String)>,
    /// Request body callbacks so far.
    body_calls: u32,
    /// The request's `:path` (`body-callout`, `trailers-callout`).
    path: String,
    /// What a `body-callout`/`trailers-callout` call holds the exchange at.
    held: Held,
    /// The size of the body held for the call.
    held_len: usize,
    /// A gRPC call to cancel in the HTTP call's callback (`grpc-cancel`,
    /// `/inflight`).
    grpc_token: Option<u32>,
    /// The replies an `/await-count/` request's stream delivered so far.
    stream_seen: Vec<String>,
    /// `late-call`, `wrong-resume`: call callbacks so far.
    calls: u32,
    /// `late-call`: response body callbacks so far.
    resp_body_calls: u32,
    /// `stop-b`: the callbacks so far, in order (`h` request headers, `b`
    /// request body, `H` response headers, `B` response body).
    trace: String,
    /// `order`: `on_done` was called.
    done: bool,
}

impl Filter {
    /// `tick-resume`: a body callback while this context still waits for
    /// the tick counts in `pw_tick_early_body`.
    fn count_early_body(&self) {
        if self.s.mode == "tick-resume"
            && WAITING.with(|w| w.borrow().iter().any(|(id, _)| *id == self.id))
        {
            hostcalls::increment_metric(self.s.early_metric, 1).ok();
        }
    }

    /// `late-call`, `wrong-resume`: an HTTP call to `authz` at `/check/<what>`.
    fn call_authz(&self, what: &str) -> Result<u32, Status> {
        let path = format!("/check/{what}");
        self.dispatch_http_call(
            "authz",
            vec![
                (":method", "GET"),
                (":path", &path),
                (":authority", "authz"),
            ],
            None,
            vec![],
            Duration::from_secs(5),
        )
    }

    /// `late-call`: a call's callback, while the exchange is not paused.
    fn late_callback(&mut self) {
        self.calls += 1;
        // The SDK panics unless these are accepted.
        match self.path.as_str() {
            // The head the headers callback's Pause holds: written there,
            // it goes on with the body (Envoy).
            "/late/held" => self.set_http_request_header("x-pw-held-write", Some("call")),
            "/late/held-resp" => self.set_http_response_header("x-pw-held-write", Some("call")),
            "/late/deny" | "/late/held-deny" | "/late/held-resp-deny" => self.send_http_response(
                403,
                vec![("x-pw-late-denied", "yes")],
                Some(b"denied late"),
            ),
            "/late/trap" => panic!("late-call guest panics between phases, on purpose"),
            // After the response head went to the client: with details, for
            // the access log and `on_log`.
            "/late/response-deny" => {
                send_local_response_with_details(403, "late_denied", b"denied late");
            }
            _ => self.set_http_request_header("x-pw-late", Some("1")),
        }
        // Last: a test that sees it knows the callback ran.
        hostcalls::increment_metric(self.s.late_metrics[0], 1).ok();
    }

    /// `late-call`, `/late/held…`: a body call while the headers callback's
    /// Pause holds the head: the first sends the call, every one but the
    /// end of stream holds its data.
    fn late_held_body(&mut self, first: bool, end_of_stream: bool) -> Action {
        if first {
            if let Err(e) = self.call_authz("late") {
                self.send_http_response(500, vec![("x-pw-call-error", &format!("{e:?}"))], None);
                return Action::Pause;
            }
        }
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    /// Half-closes stream `token`, logging a refusal (the SDK's own helper
    /// panics on one).
    fn close_grpc_stream_or_log(&self, token: u32) {
        if let Err(e) = hostcalls::close_grpc_stream(token) {
            proxy_wasm::hostcalls::log(LogLevel::Warn, &format!("close {token}: {e:?}")).ok();
        }
    }
}

/// The part a `body-callout`/`trailers-callout` call was sent for.
#[derive(Clone, Copy, PartialEq)]
enum Held {
    None,
    RequestBody,
    ResponseBody,
    RequestTrailers,
    ResponseTrailers,
}

impl Filter {
    /// The held-body mode a streamed mode behaves as after its headers
    /// callbacks (`stream-callout` is `body-callout`, `stream-trailers` is
    /// `trailers-callout`).
    fn callout_mode(&self) -> &str {
        match self.s.mode.as_str() {
            "stream-callout" => "body-callout",
            "stream-trailers" => "trailers-callout",
            m => m,
        }
    }

    /// `body-callout`: sends `payload` (a whole body or a trailer) to be checked:
    /// to cluster `authz` at `/check/<what><path>`, or, for a request path under
    /// `/grpc/`, as the message of `Echo/Say` on cluster `grpc`; then `Pause`.
    fn check(&mut self, held: Held, what: &str, payload: &[u8]) -> Action {
        self.held = held;
        self.held_len = payload.len();
        let r = if self.path.starts_with("/grpc/") && held == Held::RequestBody {
            let mut m = vec![0x0a, payload.len() as u8];
            m.extend_from_slice(payload);
            self.dispatch_grpc_call(
                "grpc",
                "legate.test.v1.Echo",
                "Say",
                vec![],
                Some(&m),
                Duration::from_secs(5),
            )
        } else {
            let path = format!("/check/{what}{}", self.path);
            self.dispatch_http_call(
                "authz",
                vec![
                    (":method", "POST"),
                    (":path", &path),
                    (":authority", "authz"),
                ],
                Some(payload),
                vec![],
                Duration::from_secs(5),
            )
        };
        if let Err(e) = r {
            let e = format!("{e:?}");
            self.send_http_response(500, vec![("x-pw-call-error", &e)], None);
        }
        Action::Pause
    }

    /// `body-callout`: the checking service's answer for the held part: `ok`
    /// replaces the held body (or sets trailer `x-pw-trailer-checked`) with
    /// `answer` and resumes; a denial answers locally.
    fn checked(&mut self, ok: bool, answer: &[u8]) {
        let answer_text = String::from_utf8_lossy(answer).into_owned();
        match (self.held, ok) {
            (Held::RequestBody, true) => {
                // The held body is still readable here, and writable.
                let body = self
                    .get_http_request_body(0, self.held_len)
                    .unwrap_or_default();
                self.set_http_request_header("x-pw-held-len", Some(&body.len().to_string()));
                self.set_http_request_body(0, self.held_len, answer);
                self.resume_http_request();
            }
            (Held::ResponseBody, true) => {
                let body = self
                    .get_http_response_body(0, self.held_len)
                    .unwrap_or_default();
                self.set_http_response_header("x-pw-held-len", Some(&body.len().to_string()));
                self.set_http_response_body(0, self.held_len, answer);
                self.resume_http_response();
            }
            (Held::RequestTrailers, true) => {
                self.set_http_request_trailer("x-pw-trailer-checked", Some(&answer_text));
                self.resume_http_request();
            }
            (Held::ResponseTrailers, true) => {
                self.set_http_response_trailer("x-pw-trailer-checked", Some(&answer_text));
                self.resume_http_response();
            }
            (Held::ResponseBody | Held::ResponseTrailers, false) => {
                self.send_http_response(451, vec![("x-pw-resp-denied", "yes")], Some(answer));
            }
            (_, false) => {
                self.send_http_response(403, vec![("x-pw-body-denied", "yes")], Some(answer));
            }
            (Held::None, true) => {}
        }
        self.held = Held::None;
    }
}

impl Context for Filter {
    fn on_done(&mut self) -> bool {
        self.done = true;
        true
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let m = self.get_grpc_stream_message(0, size).unwrap_or_default();
        if self.path.starts_with("/unpaused/") {
            let text = match m.as_slice() {
                [0x0a, n, rest @ ..] if usize::from(*n) <= rest.len() => {
                    String::from_utf8_lossy(&rest[..usize::from(*n)]).into_owned()
                }
                _ => "<undecodable>".to_string(),
            };
            // The request head went out already: Envoy answers OK (the
            // change goes nowhere), and so must this host, or the SDK's
            // helpers panic.
            let w = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-pw-late", Some(&text));
            self.seen
                .push(("x-pw-unpaused-write".into(), format!("{w:?}")));
            // Reads see the head as the context's last callback left it.
            let read = |name: &str| {
                hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
                    .map(|v| v.unwrap_or_else(|| "<none>".into()))
                    .unwrap_or_else(|e| format!("{e:?}"))
            };
            let pairs = hostcalls::get_map(MapType::HttpRequestHeaders)
                .map(|p| p.len())
                .unwrap_or(0);
            self.seen.push((
                "x-pw-unpaused-read".into(),
                format!("{}|{}|{}", read(":path"), read("x-probe"), pairs > 4),
            ));
            if text == "deny" {
                self.send_http_response(
                    403,
                    vec![("x-pw-stream-verdict", "deny")],
                    Some(b"denied by the stream"),
                );
            }
            self.close_grpc_stream_or_log(token);
            return;
        }
        if self.path == "/await-body" {
            let text = match m.as_slice() {
                [0x0a, n, rest @ ..] if usize::from(*n) <= rest.len() => {
                    String::from_utf8_lossy(&rest[..usize::from(*n)]).into_owned()
                }
                _ => "<undecodable>".to_string(),
            };
            self.set_http_request_body(0, self.held_len, format!("stream:{text}").as_bytes());
            self.close_grpc_stream_or_log(token);
            self.resume_http_request();
        } else if self.path.starts_with("/await/") || self.path == "/await-late" {
            // SayReply: field 1 (message) first.
            let text = match m.as_slice() {
                [0x0a, n, rest @ ..] if usize::from(*n) <= rest.len() => {
                    String::from_utf8_lossy(&rest[..usize::from(*n)]).into_owned()
                }
                _ => "<undecodable>".to_string(),
            };
            if text == "deny" {
                self.send_http_response(
                    403,
                    vec![("x-pw-stream-verdict", "deny")],
                    Some(b"denied by the stream"),
                );
                return;
            }
            self.set_http_request_header("x-pw-stream-verdict", Some(&text));
            // Done with it: half-close; the server ends the stream.
            self.close_grpc_stream_or_log(token);
            self.resume_http_request();
        } else if let Some(rest) = self.path.strip_prefix("/await-count/") {
            // CountReply: field 1 (n), a one-byte varint here.
            let n = match m.as_slice() {
                [0x08, n] => n.to_string(),
                _ => "?".to_string(),
            };
            self.stream_seen.push(n);
            let want = rest
                .split('/')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(1);
            if self.stream_seen.len() == want && !rest.contains("/never") {
                let seen = self.stream_seen.join(",");
                self.set_http_request_header("x-pw-stream-seen", Some(&seen));
                self.resume_http_request();
            }
        }
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        if self.path.starts_with("/await-count/") && self.path.contains("/resume-on-close") {
            self.set_http_request_header("x-pw-stream-close", Some(&status.to_string()));
            self.resume_http_request();
        }
    }

    fn on_grpc_call_response(&mut self, _token: u32, status: u32, size: usize) {
        if self.s.mode == "late-call" {
            self.late_callback();
            return;
        }
        if self.path == "/await-late" {
            match hostcalls::open_grpc_stream("grpc", "legate.test.v1.Echo", "Chat", vec![]) {
                Ok(t) => {
                    hostcalls::send_grpc_stream_message(t, Some(&say_request("late")), false).ok();
                }
                Err(e) => {
                    self.send_http_response(500, vec![("x-pw-open", &format!("{e:?}"))], None)
                }
            }
            return;
        }
        if self.path == "/await-cancel" {
            if let Some(t) = self.grpc_token {
                hostcalls::cancel_grpc_stream(t).ok();
            }
            return;
        }
        if self.callout_mode() == "body-callout" {
            let body = self
                .get_grpc_call_response_body(0, size)
                .unwrap_or_default();
            let reply = match body.as_slice() {
                [0x0a, n, rest @ ..] if usize::from(*n) <= rest.len() => {
                    rest[..usize::from(*n)].to_vec()
                }
                _ => b"<undecodable>".to_vec(),
            };
            let mut answer = b"grpc:".to_vec();
            answer.extend_from_slice(&reply);
            self.checked(status == 0, &answer);
            return;
        }
        if status == 0 {
            let body = self
                .get_grpc_call_response_body(0, size)
                .unwrap_or_default();
            // SayReply: field 1 (message) is first; the metadata map follows.
            let reply = match body.as_slice() {
                [0x0a, n, rest @ ..] if usize::from(*n) <= rest.len() => {
                    String::from_utf8_lossy(&rest[..usize::from(*n)]).into_owned()
                }
                _ => "<undecodable>".to_string(),
            };
            self.set_http_request_header("x-pw-grpc-reply", Some(&reply));
            let seen = body.windows(15).any(|w| w == b"from-proxy-wasm");
            self.set_http_request_header("x-pw-md-seen", Some(if seen { "yes" } else { "no" }));
            self.resume_http_request();
            return;
        }
        let (code, message) = self.get_grpc_status();
        let code = match code {
            1 => GrpcStatusCode::Cancelled,
            3 => GrpcStatusCode::InvalidArgument,
            4 => GrpcStatusCode::DeadlineExceeded,
            5 => GrpcStatusCode::NotFound,
            7 => GrpcStatusCode::PermissionDenied,
            8 => GrpcStatusCode::ResourceExhausted,
            9 => GrpcStatusCode::FailedPrecondition,
            12 => GrpcStatusCode::Unimplemented,
            13 => GrpcStatusCode::Internal,
            14 => GrpcStatusCode::Unavailable,
            16 => GrpcStatusCode::Unauthenticated,
            _ => GrpcStatusCode::Unknown,
        };
        self.send_grpc_response(code, message.as_deref(), vec![("x-pw-grpc", b"failed")]);
    }

    fn on_http_call_response(
        &mut self,
        _token: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if self.s.mode == "late-call" {
            self.late_callback();
            return;
        }
        if self.s.mode == "wrong-resume" {
            self.calls += 1;
            let request = self.path.starts_with("/req");
            if self.calls == 1 {
                // Nothing of that direction is paused: Envoy's continue
                // does nothing (and answers OK).
                if request {
                    self.resume_http_response();
                } else {
                    self.resume_http_request();
                }
                if let Err(e) = self.call_authz("second") {
                    self.send_http_response(
                        500,
                        vec![("x-pw-call-error", &format!("{e:?}"))],
                        None,
                    );
                }
            } else if request {
                self.set_http_request_header("x-pw-resumed-by", Some("second"));
                self.resume_http_request();
            } else {
                self.set_http_response_header("x-pw-resumed-by", Some("second"));
                self.resume_http_response();
            }
            return;
        }
        if matches!(self.callout_mode(), "body-callout" | "trailers-callout") {
            let status = self
                .get_http_call_response_header(":status")
                .unwrap_or_default();
            let body = self
                .get_http_call_response_body(0, body_size)
                .unwrap_or_default();
            self.checked(num_headers > 0 && status == "200", &body);
            return;
        }
        if num_headers == 0 {
            self.send_http_response(
                503,
                vec![("x-pw-call", "failed")],
                Some(b"authz unavailable\n"),
            );
            return;
        }
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        if status == "200" {
            if let Some(t) = self.grpc_token.take() {
                let r = format!("{:?}", hostcalls::cancel_grpc_call(t));
                self.set_http_request_header("x-pw-cancel", Some(&r));
            }
            let v = String::from_utf8_lossy(&body).into_owned();
            self.set_http_request_header("x-pw-authz", Some(&v));
            let trailers = self.get_http_call_response_trailers();
            self.set_http_request_header(
                "x-pw-call-trailers",
                Some(&format!("{}:{}", _trailers, trailers.len())),
            );
            self.resume_http_request();
        } else {
            let code = status.parse::<u32>().unwrap_or(500);
            self.send_http_response(code, vec![("x-pw-denied", "yes")], Some(&body));
        }
    }
}

fn prop(c: &dyn Context, path: &[&str]) -> String {
    match c.get_property(path.to_vec()) {
        Some(b) => {
            if b.len() == 8
                && matches!(
                    path,
                    ["response", "code"]
                        | ["source", "port"]
                        | ["request", "size"]
                        | ["destination", "port"]
                        | ["connection", "id"]
                        | ["connection_id"]
                        | ["request", "time"]
                )
            {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b);
                i64::from_le_bytes(a).to_string()
            } else {
                String::from_utf8_lossy(&b).into_owned()
            }
        }
        None => "<none>".to_string(),
    }
}

/// The keys of a map in the pairs format, joined with `,`.
fn pair_keys(b: &[u8]) -> String {
    let word = |i: usize| -> Option<usize> {
        let w: [u8; 4] = b.get(i..i + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(w)).ok()
    };
    let Some(n) = word(0) else {
        return String::new();
    };
    let mut at = 4 + 8 * n;
    let mut keys = Vec::new();
    for i in 0..n {
        let (Some(kl), Some(vl)) = (word(4 + 8 * i), word(8 + 8 * i)) else {
            break;
        };
        let Some(k) = b.get(at..at + kl) else {
            break;
        };
        keys.push(String::from_utf8_lossy(k).into_owned());
        at += kl + 1 + vl + 1;
    }
    keys.join(",")
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    /// WASI's `fd_fdstat_get(fd, *fdstat) -> errno` (`fdstat`: 24 bytes,
    /// the file type first, the base rights at 8).
    #[link_name = "fd_fdstat_get"]
    fn wasi_fd_fdstat_get(fd: u32, stat: *mut u8) -> u16;
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    // Emscripten's runtime imports (`emscripten`): C++ SDK filters have them.
    fn emscripten_notify_memory_growth(memory_index: u32);
    fn pthread_equal(a: u32, b: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_set_header_map_pairs(map_type: u32, data: *const u8, size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

/// An int property as text (`none` when it is not found).
fn int_prop(c: &dyn Context, path: &[&str]) -> String {
    c.get_property(path.to_vec())
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or("none".to_string(), |b| i64::from_le_bytes(b).to_string())
}

/// Adds 1 to counter `name` (defined on first use).
fn bump(name: &str) {
    if let Ok(m) = hostcalls::define_metric(MetricType::Counter, name) {
        hostcalls::increment_metric(m, 1).ok();
    }
}

/// `sizes-so-far`: what a byte counter reads of `request.size` and
/// `response.size` in each callback (see the module docs).
fn count_sizes(c: &dyn Context, at: &str) {
    let rq = int_prop(c, &["request", "size"]);
    let rs = int_prop(c, &["response", "size"]);
    bump(&format!("pw_sofar_{at}_{rq}_{rs}"));
}

/// `proxy_send_local_response` with `details` (the SDK's
/// `send_http_response` sends none), no headers.
fn send_local_response_with_details(status: u32, details: &str, body: &[u8]) {
    let headers = 0u32.to_le_bytes();
    unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        );
    }
}

/// `proxy_set_header_map_pairs` on the request headers, returning the status (the
/// SDK's `set_map` panics on anything but OK).
fn set_request_pairs(pairs: &[(&str, &str)]) -> u32 {
    let mut buf = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        buf.extend((k.len() as u32).to_le_bytes());
        buf.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        buf.extend(k.as_bytes());
        buf.push(0);
        buf.extend(v.as_bytes());
        buf.push(0);
    }
    unsafe { proxy_set_header_map_pairs(0, buf.as_ptr(), buf.len()) }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, num_headers: usize, _end_of_stream: bool) -> Action {
        if self.s.mode == "noop" {
            return Action::Continue;
        }
        if !self.s.vm_config.is_empty() {
            self.seen
                .push(("x-pw-vm-config".into(), self.s.vm_config.clone()));
        }
        let path = self.get_http_request_header(":path").unwrap_or_default();
        self.path = path.clone();
        if self.s.mode == "sizes-so-far" {
            count_sizes(self, "rqhead");
            return Action::Continue;
        }
        if self.s.mode == "shared-fill" {
            // `/fill/<n>`: n keys of 1 000 000 bytes each, with the SDK's
            // `set_shared_data` (which panics on an error status), then how
            // many read back.
            let n: usize = path
                .strip_prefix("/fill/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let value = vec![7u8; 1_000_000];
            for i in 0..n {
                self.set_shared_data(&format!("pw_fill_{i}"), Some(&value), None)
                    .ok();
            }
            let stored = (0..n)
                .filter(|i| self.get_shared_data(&format!("pw_fill_{i}")).0.is_some())
                .count();
            self.send_http_response(200, vec![("x-pw-fill", &stored.to_string())], None);
            return Action::Pause;
        }
        if self.s.mode == "empty" {
            let configs = [
                ("x-pw-plugin-config", self.s.plugin_config_seen.clone()),
                ("x-pw-vm-config-seen", self.s.vm_config_seen.clone()),
            ];
            for (k, v) in configs {
                self.seen.push((k.into(), v));
            }
            let header = self.get_http_request_header_bytes("x-empty");
            self.seen
                .push(("x-pw-empty-header".into(), seen(header.as_deref())));
            self.set_shared_data("pw_empty", Some(b""), None).ok();
            let (shared, _) = self.get_shared_data("pw_empty");
            self.seen
                .push(("x-pw-empty-shared".into(), seen(shared.as_deref())));
            return Action::Continue;
        }
        if self.s.mode == "self-resume" {
            // A helper shared with a call's callback ("apply, then resume")
            // called from the callback that then pauses, as a filter with a
            // cache in front of its check does.
            self.set_http_request_header("x-pw-self", Some("resumed"));
            self.resume_http_request();
            return Action::Pause;
        }
        match self.s.mode.as_str() {
            "close" if path.starts_with("/close-request") => {
                self.reset_http_request();
            }
            "headers" => {
                if path == "/deny" {
                    self.send_http_response(
                        403,
                        vec![("x-pw-denied", "yes"), ("content-type", "text/plain")],
                        Some(b"denied by proxy-wasm\n"),
                    );
                    return Action::Pause;
                }
                if path == "/deny-twice" {
                    // Two answers in one callback: the first stands.
                    self.send_http_response(403, vec![], Some(b"first\n"));
                    self.send_http_response(451, vec![], Some(b"second\n"));
                    return Action::Pause;
                }
                if path == "/grpc-deny" {
                    self.send_grpc_response(
                        GrpcStatusCode::PermissionDenied,
                        Some("nope"),
                        vec![("x-pw-grpc", b"1")],
                    );
                    return Action::Pause;
                }
                if path == "/set-all" {
                    // One bad pair (a :path without its slash) leaves the map and
                    // the head as they were; then a good replacement takes.
                    let bad = set_request_pairs(&[
                        ("x-pw-set-all", "bad"),
                        (":path", "nope"),
                        ("x-keep", "gone"),
                    ]);
                    let after = self
                        .get_http_request_header("x-pw-set-all")
                        .unwrap_or_else(|| "-".into());
                    let keep = self
                        .get_http_request_header("x-keep")
                        .unwrap_or_else(|| "-".into());
                    self.seen
                        .push(("x-pw-set-all-bad".into(), format!("{bad}|{after}|{keep}")));
                    let good = set_request_pairs(&[
                        ("x-pw-set-all", "good"),
                        (":path", "/replaced"),
                        ("x-keep", "kept"),
                    ]);
                    self.seen
                        .push(("x-pw-set-all-good".into(), good.to_string()));
                    return Action::Continue;
                }
                let g = self.s.greeting.clone();
                self.set_http_request_header("x-pw-hello", Some(&g));
                self.set_http_request_header("x-pw-remove", None);
                self.add_http_request_header("x-pw-multi", "a");
                self.add_http_request_header("x-pw-multi", "b");
                self.seen
                    .push(("x-pw-request-count".into(), num_headers.to_string()));
                let all = self.get_http_request_headers();
                let names: Vec<&str> = all
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .filter(|k| k.starts_with(':'))
                    .collect();
                self.seen.push(("x-pw-pseudo".into(), names.join(",")));
            }
            "properties" => {
                for (name, p) in [
                    ("x-p-path", &["request", "path"][..]),
                    ("x-p-url-path", &["request", "url_path"][..]),
                    ("x-p-method", &["request", "method"][..]),
                    ("x-p-host", &["request", "host"][..]),
                    ("x-p-scheme", &["request", "scheme"][..]),
                    ("x-p-protocol", &["request", "protocol"][..]),
                    ("x-p-id", &["request", "id"][..]),
                    ("x-p-plugin-name", &["plugin_name"][..]),
                    ("x-p-root-id", &["plugin_root_id"][..]),
                    ("x-p-vm-id", &["plugin_vm_id"][..]),
                    ("x-p-route", &["route_name"][..]),
                    ("x-p-cluster", &["cluster_name"][..]),
                    ("x-p-query", &["request", "query"][..]),
                    ("x-p-xds-route", &["xds", "route_name"][..]),
                    ("x-p-xds-cluster", &["xds", "cluster_name"][..]),
                    ("x-p-source", &["source", "address"][..]),
                    ("x-p-source-port", &["source", "port"][..]),
                    ("x-p-dest-port", &["destination", "port"][..]),
                    ("x-p-conn-id", &["connection", "id"][..]),
                    ("x-p-conn-id2", &["connection_id"][..]),
                    ("x-p-missing", &["no", "such"][..]),
                    ("x-p-tls-version", &["connection", "tls_version"][..]),
                    ("x-p-sni", &["connection", "requested_server_name"][..]),
                    (
                        "x-p-peer-subject",
                        &["connection", "subject_peer_certificate"][..],
                    ),
                    (
                        "x-p-peer-uri",
                        &["connection", "uri_san_peer_certificate"][..],
                    ),
                    (
                        "x-p-peer-dns",
                        &["connection", "dns_san_peer_certificate"][..],
                    ),
                ] {
                    let v = prop(self, p);
                    self.seen.push((name.into(), v));
                }
                let hdr = prop(self, &["request", "headers", "x-probe"]);
                self.seen.push(("x-p-header".into(), hdr));
                let t = self
                    .get_property(vec!["request", "time"])
                    .map(|b| b.len())
                    .unwrap_or(0);
                self.seen.push(("x-p-time-len".into(), t.to_string()));
                let now = self.get_current_time();
                let ok = now > std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
                self.seen.push(("x-p-clock-ok".into(), ok.to_string()));
                self.set_property(vec!["my", "prop"], Some(b"stored"));
                let back = prop(self, &["my", "prop"]);
                self.seen.push(("x-p-set-prop".into(), back));
                // A built-in name: stored, but reads give the built-in.
                self.set_property(vec!["request", "method"], Some(b"SHADOW"));
                let method = prop(self, &["request", "method"]);
                self.seen.push(("x-p-shadowed-method".into(), method));
                for (name, key) in [
                    ("x-p-h-authority", ":authority"),
                    ("x-p-h-path", ":path"),
                    ("x-p-h-method", ":method"),
                    ("x-p-h-scheme", ":scheme"),
                ] {
                    let v = prop(self, &["request", "headers", key]);
                    self.seen.push((name.into(), v));
                }
                let all = self
                    .get_property(vec!["request", "headers"])
                    .map(|b| pair_keys(&b))
                    .unwrap_or_default();
                self.seen.push(("x-p-h-keys".into(), all));
            }
            "filter-state" => {
                if self.s.tag == "writer" {
                    if let Some(v) = self.get_http_request_header("x-fs-write") {
                        self.set_property(vec!["pw_peer"], Some(v.as_bytes()));
                    }
                } else {
                    let v = prop(self, &["pw_peer"]);
                    self.seen.push(("x-fs-req".into(), v));
                    let v = prop(self, &["filter_state", "wasm.pw_peer"]);
                    self.seen.push(("x-fs-state".into(), v));
                }
            }
            "share" => {
                let tag = self.s.tag.clone();
                if path == format!("/trap/{tag}") {
                    panic!("trap asked for by {tag}");
                }
                let n = SHARED_COUNT.fetch_add(1, Ordering::Relaxed) + 1;
                self.seen.push((format!("x-pw-count-{tag}"), n.to_string()));
                self.seen.push((format!("x-pw-cfg-{tag}"), tag.clone()));
                self.seen
                    .push((format!("x-pw-root-{tag}"), self.s.root_id.clone()));
                let now = prop(self, &["plugin_root_id"]);
                self.seen.push((format!("x-pw-root-now-{tag}"), now));
                // (Only the first root context ran `on_vm_start`: the id is
                // the VM's.)
                let id = VM_METRIC.load(Ordering::Relaxed);
                if id != 0 {
                    let r = hostcalls::increment_metric(id, 1);
                    self.seen
                        .push((format!("x-pw-vm-metric-{tag}"), format!("{r:?}")));
                }
            }
            "counter" => {
                let mut n = 0u64;
                for _ in 0..100 {
                    let (cur, cas) = self.get_shared_data("pw_counter");
                    let v = cur
                        .and_then(|b| String::from_utf8(b).ok())
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0);
                    n = v + 1;
                    match self.set_shared_data("pw_counter", Some(n.to_string().as_bytes()), cas) {
                        Ok(()) => break,
                        Err(Status::CasMismatch) => continue,
                        Err(_) => break,
                    }
                }
                hostcalls::increment_metric(self.s.requests_metric, 1).ok();
                let m = hostcalls::get_metric(self.s.requests_metric).unwrap_or(0);
                hostcalls::record_metric(self.s.recorded_metric, 2).ok();
                hostcalls::record_metric(self.s.histogram_metric, 7).ok();
                hostcalls::record_metric(self.s.histogram_metric, 2000).ok();
                self.seen.push(("x-pw-counter".into(), n.to_string()));
                self.seen.push(("x-pw-metric".into(), m.to_string()));
                let q = self.register_shared_queue("pw_queue");
                self.enqueue_shared_queue(q, Some(b"item")).ok();
                let item = hostcalls::dequeue_shared_queue(q).ok().flatten();
                self.seen.push((
                    "x-pw-queue".into(),
                    item.map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default(),
                ));
            }
            "queue" => {
                let vm = if self.s.target_vm.is_empty() {
                    prop(self, &["plugin_vm_id"])
                } else {
                    self.s.target_vm.clone()
                };
                let q = self.resolve_shared_queue(&vm, "pw_events");
                let same = q == Some(self.s.queue);
                if let Some(q) = q {
                    for _ in 0..self.s.burst.max(1) {
                        self.enqueue_shared_queue(q, Some(path.as_bytes())).ok();
                    }
                }
                self.seen.push(("x-pw-resolved".into(), same.to_string()));
            }
            "callout" => {
                if path.starts_with("/panic") {
                    panic!("callout guest panics on purpose");
                }
                let check = format!("/check{path}");
                let mut headers = vec![
                    (":method", "GET"),
                    (":path", check.as_str()),
                    (":authority", "authz"),
                ];
                if path.starts_with("/owned") {
                    // A field the host owns, which Envoy accepts: a length
                    // for a call with no body.
                    headers.push(("content-length", "5"));
                }
                if path.starts_with("/no-authority") {
                    // Envoy's httpCall needs `:authority` (a `host` pair
                    // is no substitute).
                    headers.retain(|(k, _)| *k != ":authority");
                    headers.push(("host", "authz"));
                }
                let r = self.dispatch_http_call(
                    &self.s.cluster,
                    headers,
                    None,
                    vec![],
                    Duration::from_millis(self.s.timeout_ms),
                );
                return match r {
                    Ok(_) => Action::Pause,
                    Err(e) => {
                        let e = format!("{e:?}");
                        self.send_http_response(500, vec![("x-pw-call-error", &e)], None);
                        Action::Pause
                    }
                };
            }
            "grpc-call" => {
                let timeout = Duration::from_millis(self.s.timeout_ms);
                let (method, message) = if let Some(msg) = path.strip_prefix("/say/") {
                    let mut m = vec![0x0a, msg.len() as u8];
                    m.extend_from_slice(msg.as_bytes());
                    ("Say", m)
                } else if let Some(code) = path.strip_prefix("/fail/") {
                    let text = b"failed on purpose";
                    let mut m = vec![
                        0x08,
                        code.parse::<u8>().unwrap_or(2),
                        0x12,
                        text.len() as u8,
                    ];
                    m.extend_from_slice(text);
                    ("Fail", m)
                } else {
                    return Action::Continue;
                };
                let r = self.dispatch_grpc_call(
                    "grpc",
                    "legate.test.v1.Echo",
                    method,
                    vec![("x-pw-md", b"from-proxy-wasm")],
                    Some(&message),
                    timeout,
                );
                return match r {
                    Ok(_) => Action::Pause,
                    Err(e) => {
                        let e = format!("{e:?}");
                        self.send_http_response(500, vec![("x-pw-call-error", &e)], None);
                        Action::Pause
                    }
                };
            }
            "grpc-cancel" => {
                // A unary gRPC call cancelled at once (twice: the second
                // finds nothing), then a pause on an HTTP call (`callout`'s
                // callback resumes); the gRPC reply must never come.
                // `slow…` makes the server wait 5 s before it answers.
                let message: &[u8] = if path.contains("/inflight") {
                    &[0x0a, 4, b's', b'l', b'o', b'w']
                } else {
                    &[0x0a, 4, b'l', b'a', b't', b'e']
                };
                let r = self.dispatch_grpc_call(
                    "grpc",
                    "legate.test.v1.Echo",
                    "Say",
                    vec![],
                    Some(message),
                    Duration::from_secs(10),
                );
                let cancels = match r {
                    // `/inflight`: cancelled in the HTTP call's callback,
                    // while the server works on it.
                    Ok(t) if path.contains("/inflight") => {
                        self.grpc_token = Some(t);
                        "later".to_string()
                    }
                    Ok(t) => format!(
                        "{:?},{:?}",
                        hostcalls::cancel_grpc_call(t),
                        hostcalls::cancel_grpc_call(t)
                    ),
                    Err(e) => format!("dispatch:{e:?}"),
                };
                self.set_http_request_header("x-pw-cancel", Some(&cancels));
                let check = format!("/check{path}");
                let r = self.dispatch_http_call(
                    "authz",
                    vec![
                        (":method", "GET"),
                        (":path", &check),
                        (":authority", "authz"),
                    ],
                    None,
                    vec![],
                    Duration::from_secs(5),
                );
                if let Err(e) = r {
                    let e = format!("{e:?}");
                    self.send_http_response(500, vec![("x-pw-call-error", &e)], None);
                }
                return Action::Pause;
            }
            "grpc-stream" => {
                if let Some(rest) = path.strip_prefix("/stream/") {
                    let (key, scenario) = rest.split_once('/').unwrap_or((rest, "count"));
                    let vm = prop(self, &["plugin_vm_id"]);
                    let q = self.resolve_shared_queue(&vm, "pw_streams");
                    let r = match q {
                        Some(q) => self
                            .enqueue_shared_queue(q, Some(format!("{key} {scenario}").as_bytes()))
                            .map(|_| "ok".to_string())
                            .unwrap_or_else(|e| format!("{e:?}")),
                        None => "no queue".to_string(),
                    };
                    self.send_http_response(200, vec![("x-pw-queued", &r)], None);
                    return Action::Pause;
                }
                if let Some(key) = path.strip_prefix("/result/") {
                    let (v, _) = self.get_shared_data(&format!("pw_stream_{key}"));
                    let v = v
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    self.send_http_response(200, vec![("x-pw-stream", &v)], None);
                    return Action::Pause;
                }
                if path == "/direct/unknown" {
                    let a = hostcalls::send_grpc_stream_message(999_999, Some(b"x"), false);
                    let b = hostcalls::close_grpc_stream(999_999);
                    let c = hostcalls::cancel_grpc_stream(999_999);
                    self.send_http_response(
                        200,
                        vec![("x-pw-unknown", &format!("{a:?},{b:?},{c:?}"))],
                        None,
                    );
                    return Action::Pause;
                }
                if let Some(word) = path.strip_prefix("/await/") {
                    // Envoy's ext_proc shape: the request waits (Pause) for
                    // the answer on a stream this context opened.
                    let r =
                        hostcalls::open_grpc_stream("grpc", "legate.test.v1.Echo", "Chat", vec![]);
                    return match r {
                        Ok(t) => {
                            self.grpc_token = Some(t);
                            hostcalls::send_grpc_stream_message(t, Some(&say_request(word)), false)
                                .ok();
                            Action::Pause
                        }
                        Err(e) => {
                            self.send_http_response(
                                500,
                                vec![("x-pw-open", &format!("{e:?}"))],
                                None,
                            );
                            Action::Pause
                        }
                    };
                }
                if let Some(word) = path.strip_prefix("/unpaused/") {
                    // A stream whose reply comes while the request is not
                    // paused (it goes on at once): its callback runs outside
                    // the exchange, writes a header and may answer.
                    if let Ok(t) =
                        hostcalls::open_grpc_stream("grpc", "legate.test.v1.Echo", "Chat", vec![])
                    {
                        self.grpc_token = Some(t);
                        hostcalls::send_grpc_stream_message(t, Some(&say_request(word)), false)
                            .ok();
                    }
                    return Action::Continue;
                }
                if path == "/await-silent" {
                    // A bidi stream the server answers only when spoken to,
                    // and nothing is sent: open, silent, and nothing else
                    // could resume the pause (bounded by `limits.pause`).
                    if let Ok(t) =
                        hostcalls::open_grpc_stream("grpc", "legate.test.v1.Echo", "Chat", vec![])
                    {
                        self.grpc_token = Some(t);
                    }
                    return Action::Pause;
                }
                if path == "/await-body" {
                    // A stream open at a headers Pause with a body to come:
                    // the host buffers the body (as without a stream); the
                    // body callback sends it on the stream and pauses until
                    // the reply, which becomes the body.
                    if let Ok(t) =
                        hostcalls::open_grpc_stream("grpc", "legate.test.v1.Echo", "Chat", vec![])
                    {
                        self.grpc_token = Some(t);
                    }
                    self.set_http_request_header("content-length", None);
                    return Action::Pause;
                }
                if path == "/await-late" || path == "/await-cancel" {
                    // A unary call first, whose callback stays paused and
                    // opens a stream (`late`: its reply resumes) or cancels
                    // the slow stream opened here (`cancel`: nothing is left
                    // that could resume).
                    if path == "/await-cancel" {
                        if let Ok(t) = hostcalls::open_grpc_stream(
                            "grpc",
                            "legate.test.v1.Echo",
                            "Count",
                            vec![],
                        ) {
                            self.grpc_token = Some(t);
                            hostcalls::send_grpc_stream_message(
                                t,
                                Some(&count_request(3, 0, "", 1000)),
                                true,
                            )
                            .ok();
                        }
                    }
                    let r = self.dispatch_grpc_call(
                        "grpc",
                        "legate.test.v1.Echo",
                        "Say",
                        vec![],
                        Some(&say_request("first")),
                        Duration::from_secs(5),
                    );
                    if let Err(e) = r {
                        self.send_http_response(500, vec![("x-pw-call", &format!("{e:?}"))], None);
                    }
                    return Action::Pause;
                }
                if let Some(rest) = path.strip_prefix("/await-count/") {
                    // A server stream of N replies, 50 ms apart: the request
                    // resumes after the last (one wake-up per reply), or on
                    // the close (`/resume-on-close`), or never (the pause
                    // fails once the stream is over).
                    let n = rest
                        .split('/')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(1);
                    let r =
                        hostcalls::open_grpc_stream("grpc", "legate.test.v1.Echo", "Count", vec![]);
                    if let Ok(t) = r {
                        self.grpc_token = Some(t);
                        hostcalls::send_grpc_stream_message(
                            t,
                            Some(&count_request(n, 0, "", 50)),
                            true,
                        )
                        .ok();
                    }
                    return Action::Pause;
                }
                if path == "/direct/leave" {
                    // A slow stream opened by this HTTP context, which ends
                    // right away: the host resets the stream with it.
                    let r =
                        hostcalls::open_grpc_stream("grpc", "legate.test.v1.Echo", "Count", vec![]);
                    if let Ok(t) = r {
                        hostcalls::send_grpc_stream_message(
                            t,
                            Some(&count_request(5, 0, "", 1000)),
                            true,
                        )
                        .ok();
                    }
                    self.send_http_response(200, vec![("x-pw-open", &format!("{r:?}"))], None);
                    return Action::Pause;
                }
                if path == "/direct/ungranted" {
                    let r = hostcalls::open_grpc_stream(
                        "backend",
                        "legate.test.v1.Echo",
                        "Count",
                        vec![],
                    );
                    self.send_http_response(200, vec![("x-pw-open", &format!("{r:?}"))], None);
                    return Action::Pause;
                }
            }
            "body-rewrite" => {
                // The body changes size: the length must go (as in Envoy).
                self.set_http_request_header("content-length", None);
            }
            "tick-change" => {
                if let Some(ms) = path.strip_prefix("/tick/").and_then(|m| m.parse().ok()) {
                    let r = hostcalls::set_tick_period(Duration::from_millis(ms));
                    let r = format!("{r:?}");
                    self.send_http_response(200, vec![("x-pw-tick-set", &r)], None);
                    return Action::Pause;
                }
            }
            "body-wait" | "peek" | "stop-a" if !_end_of_stream => return Action::Pause,
            "stop-b" => {
                self.trace.push('h');
                let a = self
                    .get_http_request_header("x-a")
                    .unwrap_or_else(|| "-".into());
                self.set_http_request_header("x-b-saw-a", Some(&a));
                self.set_http_request_header("x-b-eos", Some(&_end_of_stream.to_string()));
                self.set_http_request_header("content-length", None);
            }
            // Streamed: the head goes on now; the checked body changes size.
            "stream-callout" | "stream-trailers" => {
                self.set_http_request_header("content-length", None);
            }
            // Envoy's StopIteration: wait for the whole body (and trailers).
            "body-callout" | "trailers-callout" | "body-stuck-held" if !_end_of_stream => {
                return Action::Pause
            }
            // Nothing outstanding: a tick resumes or answers it (or, for
            // `never`, nothing does).
            "tick-resume" => {
                let what = ["resume", "local", "close"]
                    .into_iter()
                    .find(|w| path.starts_with(&format!("/wait/{w}")));
                if let Some(what) = what {
                    let id = self.id;
                    WAITING.with(|w| w.borrow_mut().push((id, what)));
                }
                if path.starts_with("/wait/")
                    && !path.starts_with("/wait/response")
                    && !path.starts_with("/wait/held-response")
                {
                    return Action::Pause;
                }
            }
            "late-call"
                if path.starts_with("/late/held")
                    && !path.starts_with("/late/held-resp")
                    && !_end_of_stream =>
            {
                return Action::Pause;
            }
            "late-call" => {
                let r = match path.as_str() {
                    "/late/http" | "/late/deny" | "/late/trap" => {
                        self.call_authz("late").map(|_| ())
                    }
                    "/late/grpc" => self
                        .dispatch_grpc_call(
                            "grpc",
                            "legate.test.v1.Echo",
                            "Say",
                            vec![],
                            Some(say_request("late").as_slice()),
                            Duration::from_secs(5),
                        )
                        .map(|_| ()),
                    _ => Ok(()),
                };
                if let Err(e) = r {
                    self.send_http_response(
                        500,
                        vec![("x-pw-call-error", &format!("{e:?}"))],
                        None,
                    );
                    return Action::Pause;
                }
            }
            "wrong-resume" if path.starts_with("/req") => {
                if let Err(e) = self.call_authz("first") {
                    self.send_http_response(
                        500,
                        vec![("x-pw-call-error", &format!("{e:?}"))],
                        None,
                    );
                }
                return Action::Pause;
            }
            "tick-callout" => {
                let (v, _) = self.get_shared_data("pw_tick_body");
                let v = v
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                self.seen.push(("x-pw-tick-body".into(), v));
            }
            "many-metrics" => {
                // A stats filter whose metric names carry values (a status
                // code, a peer): past the host's cap, and a clash of types,
                // with the SDK's `define_metric`, which panics on an error.
                let mut sum = 0;
                for i in 0..120 {
                    let m = hostcalls::define_metric(MetricType::Counter, &format!("pw_many_{i}"))
                        .unwrap();
                    hostcalls::increment_metric(m, 1).unwrap();
                    sum += hostcalls::get_metric(m).unwrap();
                }
                let g = hostcalls::define_metric(MetricType::Gauge, "pw_many_0").unwrap();
                hostcalls::record_metric(g, 5).unwrap();
                self.seen.push(("x-pw-many".into(), sum.to_string()));
            }
            "emscripten" => {
                // What a C++ SDK filter's Emscripten runtime does: its
                // allocator grows the memory and tells the host, its libc
                // compares thread ids.
                let before = core::arch::wasm32::memory_grow::<0>(1);
                // SAFETY: plain integer arguments; the host only reads them.
                let equal = unsafe {
                    emscripten_notify_memory_growth(0);
                    (pthread_equal(7, 7), pthread_equal(7, 8))
                };
                let grown = core::arch::wasm32::memory_size::<0>() - before;
                self.seen.push((
                    "x-pw-emscripten".into(),
                    format!("grew {grown}, equal {} {}", equal.0, equal.1),
                ));
            }
            "hostile" => match path.as_str() {
                "/panic" => panic!("guest panic on purpose"),
                "/loop" => {
                    let mut x = 0u64;
                    loop {
                        x = x.wrapping_add(std::hint::black_box(1));
                        if x == 0 {
                            break;
                        }
                    }
                }
                "/grow" => {
                    let v = vec![7u8; 64 << 20];
                    self.seen.push((
                        "x-pw-grew".into(),
                        std::hint::black_box(&v).len().to_string(),
                    ));
                }
                "/print" => {
                    println!("hello from stdout");
                    eprintln!("hello from stderr");
                }
                "/badptr" => {
                    // SAFETY: the host must not touch these out-of-memory pointers; it
                    // answers with a status, which is what is tested.
                    let key = b"x-probe";
                    let mut out: *mut u8 = std::ptr::null_mut();
                    let mut len: usize = 0;
                    let s1 = unsafe {
                        proxy_get_header_map_value(
                            0,
                            0xFFFF_FFF0usize as *const u8,
                            64,
                            &mut out,
                            &mut len,
                        )
                    };
                    let s2 = unsafe {
                        proxy_get_header_map_value(
                            0,
                            key.as_ptr(),
                            key.len(),
                            0xFFFF_FFFCusize as *mut *mut u8,
                            0xFFFF_FFF8usize as *mut usize,
                        )
                    };
                    let s3 = unsafe {
                        proxy_add_header_map_value(0, key.as_ptr(), usize::MAX, key.as_ptr(), 1)
                    };
                    let s4 = unsafe {
                        proxy_add_header_map_value(99, key.as_ptr(), key.len(), key.as_ptr(), 1)
                    };
                    self.seen
                        .push(("x-pw-bad".into(), format!("{s1},{s2},{s3},{s4}")));
                }
                "/badctx" => {
                    let s = unsafe { proxy_set_effective_context(987_654) };
                    let back = unsafe { proxy_set_effective_context(self.id) };
                    self.seen
                        .push(("x-pw-badctx".into(), format!("{s},{back}")));
                }
                "/fdstat" => {
                    // What a Go or TinyGo runtime probes: WASI `fd_fdstat_get`
                    // on each stdio fd (errno, and the rights of what it gave).
                    let probe = |fd: u32| {
                        let mut stat = [0u8; 24];
                        let e = unsafe { wasi_fd_fdstat_get(fd, stat.as_mut_ptr()) };
                        let rights = u64::from_le_bytes(stat[8..16].try_into().unwrap_or([0; 8]));
                        format!("{e}:{}:{rights}", stat[0])
                    };
                    let all: Vec<String> = (0..4).map(probe).collect();
                    self.seen.push(("x-pw-fdstat".into(), all.join(",")));
                }
                "/badstream" => {
                    let a = unsafe { proxy_continue_stream(9) };
                    let b = unsafe { proxy_close_stream(9) };
                    self.seen
                        .push(("x-pw-badstream".into(), format!("{a},{b}")));
                }
                "/unimpl" => {
                    let r = self.dispatch_http_call(
                        "backend",
                        vec![(":method", "GET"), (":path", "/"), (":authority", "x")],
                        None,
                        vec![],
                        Duration::from_secs(1),
                    );
                    self.seen.push(("x-pw-http-call".into(), format!("{r:?}")));
                }
                _ => {}
            },
            _ => {}
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.body_calls += 1;
        self.count_early_body();
        if self.s.mode == "sizes-so-far" {
            if end_of_stream {
                count_sizes(self, "rqbody");
            }
            return Action::Continue;
        }
        if self.s.mode == "empty" {
            if body_size > 0 && !self.seen.iter().any(|(k, _)| k == "x-pw-body-zero") {
                // Zero bytes of a body that has some, and bytes past its end.
                let zero = self.get_http_request_body(0, 0);
                let past = self.get_http_request_body(body_size, 16);
                let all = self.get_http_request_body(0, body_size);
                for (k, v) in [
                    ("x-pw-body-zero", zero),
                    ("x-pw-body-past", past),
                    ("x-pw-body-first", all),
                ] {
                    self.seen.push((k.into(), seen(v.as_deref())));
                }
            }
            return Action::Continue;
        }
        if self.s.mode == "trailers-callout" && !end_of_stream {
            // The whole message waits for the trailers' check (the head with it).
            return Action::Pause;
        }
        let mode = self.callout_mode().to_string();
        match mode.as_str() {
            "late-call"
                if self.path.starts_with("/late/held")
                    && !self.path.starts_with("/late/held-resp") =>
            {
                let first = self.body_calls == 1;
                self.late_held_body(first, end_of_stream)
            }
            "grpc-stream" if self.path == "/await-body" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                self.held_len = body_size;
                if let Some(t) = self.grpc_token {
                    let m = say_request(&String::from_utf8_lossy(&body));
                    hostcalls::send_grpc_stream_message(t, Some(&m), false).ok();
                }
                Action::Pause
            }
            "body-rewrite" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                self.seen.push((
                    "x-pw-rq-body".into(),
                    format!("{}:{}", self.body_calls, body.len()),
                ));
                // The head is out: as in Envoy, this is accepted and goes nowhere.
                self.set_http_request_header("x-pw-late", Some("1"));
                let new = String::from_utf8_lossy(&body).replace("hello", "HELLO-WORLD");
                self.set_http_request_body(0, body_size, new.as_bytes());
                Action::Continue
            }
            "body-wait" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                self.set_http_request_header("x-pw-body-len", Some(&body.len().to_string()));
                self.set_http_request_body(0, body_size, &body.to_ascii_uppercase());
                Action::Continue
            }
            "body-local" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                if String::from_utf8_lossy(&body).contains("forbidden") {
                    self.send_http_response(
                        403,
                        vec![("x-pw-body-denied", "yes")],
                        Some(b"no forbidden words\n"),
                    );
                    return Action::Pause;
                }
                Action::Continue
            }
            "body-callout" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                self.check(Held::RequestBody, "body", &body)
            }
            "peek" => {
                if self.body_calls == 1 {
                    self.set_http_request_header("x-pw-first-chunk", Some(&body_size.to_string()));
                } else {
                    self.set_http_request_header("x-pw-late", Some("1"));
                }
                Action::Continue
            }
            "stop-a" if self.path.starts_with("/mid") => {
                if self.body_calls == 1 {
                    self.set_http_request_header("x-a", Some("mid"));
                }
                Action::Continue
            }
            "stop-a" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let v = format!("{body_size}:{}", self.body_calls);
                self.set_http_request_header("x-a", Some(&v));
                Action::Continue
            }
            "stop-b" => {
                self.trace.push('b');
                self.held_len += body_size;
                if end_of_stream {
                    let mark = format!("|b:{}:{}", self.trace, self.held_len);
                    self.set_http_request_body(body_size, 0, mark.as_bytes());
                }
                Action::Continue
            }
            "body-splice" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                // Envoy's start 0, 0 < size < length: the first 5 bytes
                // replaced (same length, so content-length holds).
                self.set_http_request_body(0, 5.min(body_size), b"HELLO");
                Action::Continue
            }
            // Never continues: at end of stream Envoy waits for
            // proxy_continue_stream, and so does Legate, until the plugin's
            // `limits.pause`.
            "body-stuck" | "body-stuck-held" => Action::Pause,
            "tick-resume" if self.path.starts_with("/wait/body") => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                let upper = String::from_utf8_lossy(&body).to_uppercase();
                self.set_http_request_body(0, body_size, upper.as_bytes());
                let id = self.id;
                WAITING.with(|w| w.borrow_mut().push((id, "resume")));
                Action::Pause
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.callout_mode() == "trailers-callout" {
            let v = self
                .get_http_request_trailer("x-client-trailer")
                .unwrap_or_default();
            return self.check(Held::RequestTrailers, "trailer", v.as_bytes());
        }
        if self.s.mode == "stop-a" {
            let v = self
                .get_http_request_trailer("x-client-trailer")
                .unwrap_or_default();
            self.add_http_request_trailer("x-a-trailer", &v);
        }
        if self.s.mode == "stop-b" {
            let v = self
                .get_http_request_trailer("x-a-trailer")
                .unwrap_or_else(|| "-".into());
            self.add_http_request_trailer("x-b-saw-trailer", &v);
        }
        if self.s.mode == "trailers" {
            let v = self
                .get_http_request_trailer("x-client-trailer")
                .unwrap_or_default();
            self.add_http_request_trailer("x-pw-trailer-seen", &v);
            self.set_http_request_trailer("x-client-trailer", Some("changed"));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.count_early_body();
        if self.s.mode == "sizes-so-far" {
            if end_of_stream {
                // The chunks before this one have left; this one has not.
                let sent = int_prop(self, &["response", "size"]);
                let total = sent
                    .parse::<usize>()
                    .map_or("none".into(), |n| (n + body_size).to_string());
                bump(&format!("pw_sofar_rsbody_{sent}_{total}"));
            }
            return Action::Continue;
        }
        if self.s.mode == "trailers-callout" && !end_of_stream {
            return Action::Pause;
        }
        if self.s.mode == "close" && self.path.starts_with("/close-body") {
            self.reset_http_response();
            return Action::Continue;
        }
        let mode = self.callout_mode().to_string();
        match mode.as_str() {
            "late-call" if self.path.starts_with("/late/held-resp") => {
                self.resp_body_calls += 1;
                let first = self.resp_body_calls == 1;
                self.late_held_body(first, end_of_stream)
            }
            "body-rewrite" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                // Envoy's buffer rules: start 0 size 0 prepends, start = len appends.
                self.set_http_response_body(0, 0, b"<<");
                self.set_http_response_body(body_size + 2, 0, b">>");
                Action::Continue
            }
            "body-local" => {
                let body = self
                    .get_http_response_body(0, body_size)
                    .unwrap_or_default();
                if String::from_utf8_lossy(&body).contains("secret") {
                    self.send_http_response(
                        451,
                        vec![("x-pw-resp-denied", "yes")],
                        Some(b"redacted\n"),
                    );
                    return Action::Pause;
                }
                Action::Continue
            }
            "body-callout" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self
                    .get_http_response_body(0, body_size)
                    .unwrap_or_default();
                self.check(Held::ResponseBody, "resp", &body)
            }
            "tick-resume" if self.path.starts_with("/wait/response") => {
                if end_of_stream {
                    let id = self.id;
                    WAITING.with(|w| w.borrow_mut().push((id, "response")));
                }
                Action::Pause
            }
            "stop-a" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                self.set_http_response_header("x-a-resp", Some(&body_size.to_string()));
                Action::Continue
            }
            "stop-b" => {
                self.trace.push('B');
                if end_of_stream && self.path.starts_with("/down") {
                    let seen: String = self
                        .trace
                        .chars()
                        .filter(char::is_ascii_uppercase)
                        .collect();
                    let mark = format!("|B:{seen}");
                    self.set_http_response_body(body_size, 0, mark.as_bytes());
                }
                Action::Continue
            }
            "peek" => {
                if self.get_http_response_header("x-pw-first-chunk").is_none() {
                    self.set_http_response_header("x-pw-first-chunk", Some(&body_size.to_string()));
                } else {
                    self.set_http_response_header("x-pw-late", Some("1"));
                }
                Action::Continue
            }
            "body-wait" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self
                    .get_http_response_body(0, body_size)
                    .unwrap_or_default();
                self.set_http_response_header("x-pw-body-len", Some(&body.len().to_string()));
                self.set_http_response_body(0, body_size, &body.to_ascii_uppercase());
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_trailers(&mut self, num_trailers: usize) -> Action {
        if self.callout_mode() == "trailers-callout" {
            let v = self
                .get_http_response_trailer("x-echo-trailer")
                .unwrap_or_default();
            return self.check(Held::ResponseTrailers, "trailer", v.as_bytes());
        }
        if self.s.mode == "trailers" {
            self.add_http_response_trailer("x-pw-added", &num_trailers.to_string());
            self.set_http_response_trailer("grpc-message", None);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.s.mode == "noop" {
            return Action::Continue;
        }
        if self.s.mode == "sizes-so-far" {
            count_sizes(self, "rshead");
            // `request.total_size`: the body so far and the head's names and
            // values, pseudo-headers included, as Envoy's.
            let head: usize = self
                .get_http_request_headers_bytes()
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum();
            let size = int_prop(self, &["request", "size"])
                .parse::<usize>()
                .unwrap_or(0);
            let total = int_prop(self, &["request", "total_size"]);
            let ok = total == (size + head).to_string();
            bump(&format!("pw_sofar_total_{ok}"));
            return Action::Continue;
        }
        if self.s.mode == "self-resume" {
            self.set_http_response_header("x-pw-self-resp", Some("resumed"));
            self.resume_http_response();
            return Action::Pause;
        }
        if self.s.mode == "close" && self.path.starts_with("/close-response") {
            self.reset_http_response();
            return Action::Continue;
        }
        if self.s.mode == "late-call" && self.path.starts_with("/late/response") {
            if let Err(e) = self.call_authz("late") {
                self.send_http_response(500, vec![("x-pw-call-error", &format!("{e:?}"))], None);
                return Action::Pause;
            }
        }
        if self.s.mode == "late-call" && self.path.starts_with("/late/held-resp") && !end_of_stream
        {
            return Action::Pause;
        }
        if self.s.mode == "tick-resume" && self.path.starts_with("/wait/held-response") {
            // Waits for the tick, body and all (Envoy's default): the body
            // callback comes after the tick resumed the response.
            self.set_http_response_header("x-pw-waited", Some("held"));
            let id = self.id;
            WAITING.with(|w| w.borrow_mut().push((id, "response")));
            return Action::Pause;
        }
        if self.s.mode == "tick-resume" && self.path.starts_with("/wait/response") {
            // The head waits for the body, whose end waits for the tick.
            self.set_http_response_header("x-pw-waited", Some("response"));
            if end_of_stream {
                let id = self.id;
                WAITING.with(|w| w.borrow_mut().push((id, "response")));
            }
            return Action::Pause;
        }
        if self.s.mode == "wrong-resume" && self.path.starts_with("/resp") {
            if let Err(e) = self.call_authz("first") {
                self.send_http_response(500, vec![("x-pw-call-error", &format!("{e:?}"))], None);
            }
            return Action::Pause;
        }
        if matches!(
            self.s.mode.as_str(),
            "body-rewrite" | "stream-callout" | "stream-trailers"
        ) {
            self.set_http_response_header("content-length", None);
        }
        if self.s.mode == "stop-b" {
            self.trace.push('H');
            let a = self
                .get_http_response_header("x-a-resp")
                .unwrap_or_else(|| "-".into());
            self.set_http_response_header("x-b-saw-a-resp", Some(&a));
            self.set_http_response_header("content-length", None);
        }
        if matches!(
            self.s.mode.as_str(),
            "body-wait" | "body-local" | "body-callout" | "trailers-callout" | "peek" | "stop-a"
        ) && !end_of_stream
        {
            return Action::Pause;
        }
        if self.s.mode == "headers" {
            self.add_http_response_header("x-pw-response", "1");
            // The request head is out: as in Envoy, the write is accepted (the SDK
            // panics otherwise) and goes nowhere.
            self.set_http_request_header("x-pw-from-response", Some("1"));
            // The request head as it went upstream, read after it went: the
            // filter's own changes and the host's `x-forwarded-proto` included.
            let later: Vec<String> = [
                "x-keep",
                "x-pw-hello",
                "x-pw-remove",
                "x-pw-multi",
                "x-forwarded-proto",
            ]
            .iter()
            .map(|h| {
                self.get_http_request_header(h)
                    .unwrap_or_else(|| "-".into())
            })
            .collect();
            self.add_http_response_header("x-pw-request-later", &later.join("|"));
        }
        if self.s.mode == "filter-state" && self.s.tag == "reader" {
            let v = prop(self, &["pw_peer"]);
            self.seen.push(("x-fs-resp".into(), v));
        }
        if self.s.mode == "properties" {
            let status = prop(self, &["response", "headers", ":status"]);
            self.seen.push(("x-p-h-status".into(), status));
            let code = prop(self, &["response", "code"]);
            self.seen.push(("x-p-code".into(), code));
            let details = prop(self, &["response", "code_details"]);
            self.seen.push(("x-p-code-details".into(), details));
        }
        for (k, v) in std::mem::take(&mut self.seen) {
            self.add_http_response_header(&k, &v);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.s.mode == "noop" {
            return;
        }
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("on_log {}", self.id)).ok();
        if self.s.mode == "sizes-so-far" {
            count_sizes(self, "log");
            return;
        }
        if self.s.mode == "order" {
            let name = if self.done {
                "pw_log_after_done"
            } else {
                "pw_log_before_done"
            };
            if let Ok(m) = hostcalls::define_metric(MetricType::Counter, name) {
                hostcalls::increment_metric(m, 1).ok();
            }
        }
        if self.s.mode == "late-call" && self.calls > 0 {
            hostcalls::increment_metric(self.s.late_metrics[1], 1).ok();
        }
        if self.s.mode == "filter-state" && self.s.tag == "reader" {
            let v = self
                .get_property(vec!["pw_peer"])
                .map_or("none".to_string(), |b| {
                    String::from_utf8_lossy(&b).into_owned()
                });
            let name = format!("pw_fs_logged_{v}");
            if let Ok(m) = hostcalls::define_metric(MetricType::Counter, &name) {
                hostcalls::increment_metric(m, 1).ok();
            }
        }
        if self.s.mode == "grpc-stats" {
            // What a gRPC stats filter records: the status and the trailers,
            // as counter `pw_grpc_stats_<response.grpc_status>_<trailer
            // names>_<response.trailers.grpc-message>`.
            let status = self
                .get_property(vec!["response", "grpc_status"])
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or("none".to_string(), |b| i64::from_le_bytes(b).to_string());
            let keys = self
                .get_property(vec!["response", "trailers"])
                .map_or("none".to_string(), |b| pair_keys(&b));
            let message = prop(self, &["response", "trailers", "grpc-message"]);
            let name = format!("pw_grpc_stats_{status}_{keys}_{message}");
            if let Ok(m) = hostcalls::define_metric(MetricType::Counter, &name) {
                hostcalls::increment_metric(m, 1).ok();
            }
            // And the body sizes, as counter `pw_sizes_<request.size>_<response.size>`.
            let size = |c: &Self, which: &str| {
                c.get_property(vec![which, "size"])
                    .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                    .map_or("none".to_string(), |b| i64::from_le_bytes(b).to_string())
            };
            let name = format!(
                "pw_sizes_{}_{}",
                size(self, "request"),
                size(self, "response")
            );
            if let Ok(m) = hostcalls::define_metric(MetricType::Counter, &name) {
                hostcalls::increment_metric(m, 1).ok();
            }
            // And Envoy's response flags, as counter `pw_flags_<response.flags>`.
            let flags = self
                .get_property(vec!["response", "flags"])
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or("none".to_string(), |b| i64::from_le_bytes(b).to_string());
            if let Ok(m) =
                hostcalls::define_metric(MetricType::Counter, &format!("pw_flags_{flags}"))
            {
                hostcalls::increment_metric(m, 1).ok();
            }
        }
        if self.s.mode.starts_with("stream-")
            || matches!(self.s.mode.as_str(), "close" | "late-call" | "logger")
        {
            // What `on_log` sees of the end of the exchange, as a counter
            // `pw_logged_<response.code>_<response.code_details>`.
            let code = self
                .get_property(vec!["response", "code"])
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or("none".to_string(), |b| u64::from_le_bytes(b).to_string());
            let details = self
                .get_property(vec!["response", "code_details"])
                .map_or("none".to_string(), |b| {
                    String::from_utf8_lossy(&b).into_owned()
                });
            let name = format!("pw_logged_{code}_{details}");
            if let Ok(m) = hostcalls::define_metric(MetricType::Counter, &name) {
                hostcalls::increment_metric(m, 1).ok();
            }
        }
    }
}
