// c-filter: a Legate HTTP filter written in C against abi/wit (world
// `legate:filter/http-filter@0.1.3`), to show that a filter is any language
// that compiles to a WebAssembly component, not only Rust.
//
// Behaviour:
//   - request headers: `x-c-filter-block: yes` -> local 403 with body
//     "blocked by c-filter\n"; otherwise set `x-c-filter: seen`;
//   - response headers: set `x-c-filter-lang: c`;
//   - configure: accepts JSON `null` or an object (its keys are ignored),
//     declares only the request-headers and response-headers phases, and
//     rejects anything else with a one-line message.
//
// The declarations come from `http_filter.h`, generated from abi/wit by
// `scripts/build-c-filter.sh` (wit-bindgen's C generator). Ownership follows
// wit-bindgen's C conventions: arguments of exported functions are owned by
// the callee (free them), arguments of imported functions are borrowed, and
// what an export returns is freed by the generated post-return function, so
// it must come from malloc.
//
// Only malloc/free/memcpy from wasi-libc are used: no stdio, so the module
// imports no WASI functions and needs no preview-1 adapter.

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "http_filter.h"

// ---- small helpers ------------------------------------------------------

// A borrowed WIT string (or field-value, which has the same layout) over a C
// string literal: imports only read their arguments.
static http_filter_string_t str_lit(const char *s) {
    return (http_filter_string_t){(uint8_t *)s, strlen(s)};
}

static legate_filter_types_field_value_t value_lit(const char *s) {
    return (legate_filter_types_field_value_t){(uint8_t *)s, strlen(s)};
}

// A malloc'd copy, for values handed back to the host (post-return frees
// them). NULL only if malloc failed.
static uint8_t *dup_bytes(const char *s, size_t len) {
    if (len == 0) {
        return NULL;  // an empty list is {NULL, 0}; post-return skips it
    }
    uint8_t *p = malloc(len);
    if (p != NULL) {
        memcpy(p, s, len);
    }
    return p;
}

static bool ascii_eq_nocase(const uint8_t *a, size_t a_len, const char *b) {
    size_t b_len = strlen(b);
    if (a_len != b_len) {
        return false;
    }
    for (size_t i = 0; i < a_len; i++) {
        uint8_t x = a[i], y = (uint8_t)b[i];
        if (x >= 'A' && x <= 'Z') x = (uint8_t)(x - 'A' + 'a');
        if (y >= 'A' && y <= 'Z') y = (uint8_t)(y - 'A' + 'a');
        if (x != y) {
            return false;
        }
    }
    return true;
}

// ---- a minimal JSON validator -------------------------------------------
// The host hands `config` over as JSON text. Only its top-level kind matters
// here, but a malformed document is rejected too rather than half-read.

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
    int depth;
} json_t;

enum { JSON_MAX_DEPTH = 64 };

static void json_ws(json_t *j) {
    while (j->p < j->end &&
           (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) {
        j->p++;
    }
}

static bool json_lit(json_t *j, const char *lit) {
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0) {
        return false;
    }
    j->p += n;
    return true;
}

static bool json_string(json_t *j) {
    if (j->p >= j->end || *j->p != '"') return false;
    j->p++;
    while (j->p < j->end) {
        uint8_t c = *j->p++;
        if (c == '"') return true;
        if (c < 0x20) return false;
        if (c == '\\') {
            if (j->p >= j->end) return false;
            uint8_t e = *j->p++;
            if (e == 'u') {
                for (int i = 0; i < 4; i++) {
                    if (j->p >= j->end) return false;
                    uint8_t h = *j->p++;
                    bool hex = (h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') ||
                               (h >= 'A' && h <= 'F');
                    if (!hex) return false;
                }
            } else if (strchr("\"\\/bfnrt", e) == NULL || e == 0) {
                return false;
            }
        }
    }
    return false;
}

static bool json_digits(json_t *j) {
    const uint8_t *start = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    return j->p > start;
}

static bool json_number(json_t *j) {
    if (j->p < j->end && *j->p == '-') j->p++;
    if (j->p < j->end && *j->p == '0') {
        j->p++;
    } else if (!json_digits(j)) {
        return false;
    }
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!json_digits(j)) return false;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (!json_digits(j)) return false;
    }
    return true;
}

static bool json_value(json_t *j);

// `open` has been consumed; parses members up to and including `close`.
static bool json_container(json_t *j, uint8_t close, bool object) {
    if (++j->depth > JSON_MAX_DEPTH) return false;
    json_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        j->depth--;
        return true;
    }
    for (;;) {
        json_ws(j);
        if (object) {
            if (!json_string(j)) return false;
            json_ws(j);
            if (j->p >= j->end || *j->p != ':') return false;
            j->p++;
        }
        if (!json_value(j)) return false;
        json_ws(j);
        if (j->p >= j->end) return false;
        uint8_t c = *j->p++;
        if (c == close) break;
        if (c != ',') return false;
    }
    j->depth--;
    return true;
}

static bool json_value(json_t *j) {
    json_ws(j);
    if (j->p >= j->end) return false;
    switch (*j->p) {
        case '{': j->p++; return json_container(j, '}', true);
        case '[': j->p++; return json_container(j, ']', false);
        case '"': return json_string(j);
        case 't': return json_lit(j, "true");
        case 'f': return json_lit(j, "false");
        case 'n': return json_lit(j, "null");
        default: return json_number(j);
    }
}

// NULL if `text` is JSON null or an object; otherwise why it is not.
static const char *check_config(const uint8_t *text, size_t len) {
    json_t j = {text, text + len, 0};
    json_ws(&j);
    if (j.p >= j.end) {
        return "c-filter: config is empty: expected JSON null or an object";
    }
    uint8_t first = *j.p;
    if (!json_value(&j)) {
        return "c-filter: config is not valid JSON: expected null or an object";
    }
    json_ws(&j);
    if (j.p != j.end) {
        return "c-filter: config has trailing data after the JSON value";
    }
    if (first != '{' && first != 'n') {
        return "c-filter: config must be null or an object (e.g. `config: {}`), "
               "got another JSON value";
    }
    return NULL;
}

// ---- exports --------------------------------------------------------------

bool exports_legate_filter_http_handler_configure(
    http_filter_string_t *config, exports_legate_filter_http_handler_http_setup_t *ret,
    http_filter_string_t *err) {
    const char *problem = check_config(config->ptr, config->len);
    http_filter_string_free(config);
    if (problem != NULL) {
        http_filter_string_dup(err, problem);
        return false;
    }
    ret->phases = LEGATE_FILTER_HTTP_PHASES_REQUEST_HEADERS |
                  LEGATE_FILTER_HTTP_PHASES_RESPONSE_HEADERS;
    // No body phase is declared, so the modes only need to be well-formed.
    ret->request_body_mode = LEGATE_FILTER_TYPES_BODY_MODE_SKIPPED;
    ret->response_body_mode = LEGATE_FILTER_TYPES_BODY_MODE_SKIPPED;
    ret->tick_interval_ms = 0;
    return true;
}

static const char BLOCK_BODY[] = "blocked by c-filter\n";
static const char CONTENT_TYPE[] = "text/plain; charset=utf-8";

// The 403 local response. Everything in it is malloc'd: post-return frees it.
static void blocked_response(exports_legate_filter_http_handler_action_t *ret) {
    legate_filter_http_local_response_t *r = &ret->val.respond;
    ret->tag = LEGATE_FILTER_HTTP_ACTION_RESPOND;
    r->status = 403;

    legate_filter_types_tuple2_field_name_field_value_t *field = malloc(sizeof(*field));
    if (field != NULL) {
        http_filter_string_dup(&field->f0, "content-type");
        field->f1.len = sizeof(CONTENT_TYPE) - 1;
        field->f1.ptr = dup_bytes(CONTENT_TYPE, field->f1.len);
        r->headers.ptr = field;
        r->headers.len = 1;
    } else {
        r->headers.ptr = NULL;
        r->headers.len = 0;
    }

    r->body.len = sizeof(BLOCK_BODY) - 1;
    r->body.ptr = dup_bytes(BLOCK_BODY, r->body.len);
    http_filter_string_dup(&r->details, "c_filter_block");
    if (r->body.ptr == NULL || r->details.ptr == NULL ||
        (field != NULL && (field->f0.ptr == NULL || field->f1.ptr == NULL))) {
        abort();  // out of guest memory: a trap is the honest failure
    }
}

void exports_legate_filter_http_handler_on_request_headers(
    uint64_t context, exports_legate_filter_http_handler_borrow_exchange_t exchange,
    exports_legate_filter_http_handler_borrow_headers_t headers, bool end_of_stream,
    exports_legate_filter_http_handler_action_t *ret) {
    (void)context;
    (void)exchange;
    (void)end_of_stream;

    http_filter_string_t name = str_lit("x-c-filter-block");
    legate_filter_http_field_value_t value;
    bool block = false;
    if (legate_filter_http_method_headers_get(headers, &name, &value)) {
        block = ascii_eq_nocase(value.ptr, value.len, "yes");
        legate_filter_types_field_value_free(&value);
    }
    if (block) {
        blocked_response(ret);
        return;
    }

    http_filter_string_t seen_name = str_lit("x-c-filter");
    legate_filter_types_field_value_t seen_value = value_lit("seen");
    legate_filter_http_error_t err;
    // A failed write (e.g. the header limit) is not worth failing the
    // request over: the marker header is informational.
    (void)legate_filter_http_method_headers_set(headers, &seen_name, &seen_value, &err);
    ret->tag = LEGATE_FILTER_HTTP_ACTION_CONTINUE;
}

void exports_legate_filter_http_handler_on_response_headers(
    uint64_t context, exports_legate_filter_http_handler_borrow_exchange_t exchange,
    exports_legate_filter_http_handler_borrow_headers_t headers, bool end_of_stream,
    exports_legate_filter_http_handler_action_t *ret) {
    (void)context;
    (void)exchange;
    (void)end_of_stream;
    http_filter_string_t name = str_lit("x-c-filter-lang");
    legate_filter_types_field_value_t value = value_lit("c");
    legate_filter_http_error_t err;
    (void)legate_filter_http_method_headers_set(headers, &name, &value, &err);
    ret->tag = LEGATE_FILTER_HTTP_ACTION_CONTINUE;
}

// ---- phases this filter does not declare ----------------------------------
// The world exports the whole `http-handler` interface, so every function
// must exist; the host never calls an undeclared phase, and these answer
// `continue` (and free what they own) should one be called anyway.

void exports_legate_filter_http_handler_on_tick(void) {}

void exports_legate_filter_http_handler_on_tick_callout_response(
    exports_legate_filter_http_handler_callout_id_t id,
    exports_legate_filter_http_handler_result_callout_response_error_t *response) {
    (void)id;
    exports_legate_filter_http_handler_result_callout_response_error_free(response);
}

void exports_legate_filter_http_handler_on_request_body(
    uint64_t context, exports_legate_filter_http_handler_borrow_exchange_t exchange,
    exports_legate_filter_http_handler_borrow_buffer_t body, bool end_of_stream,
    exports_legate_filter_http_handler_action_t *ret) {
    (void)context, (void)exchange, (void)body, (void)end_of_stream;
    ret->tag = LEGATE_FILTER_HTTP_ACTION_CONTINUE;
}

void exports_legate_filter_http_handler_on_request_trailers(
    uint64_t context, exports_legate_filter_http_handler_borrow_exchange_t exchange,
    exports_legate_filter_http_handler_borrow_headers_t trailers,
    exports_legate_filter_http_handler_action_t *ret) {
    (void)context, (void)exchange, (void)trailers;
    ret->tag = LEGATE_FILTER_HTTP_ACTION_CONTINUE;
}

void exports_legate_filter_http_handler_on_response_body(
    uint64_t context, exports_legate_filter_http_handler_borrow_exchange_t exchange,
    exports_legate_filter_http_handler_borrow_buffer_t body, bool end_of_stream,
    exports_legate_filter_http_handler_action_t *ret) {
    (void)context, (void)exchange, (void)body, (void)end_of_stream;
    ret->tag = LEGATE_FILTER_HTTP_ACTION_CONTINUE;
}

void exports_legate_filter_http_handler_on_response_trailers(
    uint64_t context, exports_legate_filter_http_handler_borrow_exchange_t exchange,
    exports_legate_filter_http_handler_borrow_headers_t trailers,
    exports_legate_filter_http_handler_action_t *ret) {
    (void)context, (void)exchange, (void)trailers;
    ret->tag = LEGATE_FILTER_HTTP_ACTION_CONTINUE;
}

void exports_legate_filter_http_handler_on_log(
    uint64_t context, exports_legate_filter_http_handler_borrow_exchange_t exchange) {
    (void)context, (void)exchange;
}

void exports_legate_filter_http_handler_on_callout_response(
    uint64_t context, exports_legate_filter_http_handler_borrow_exchange_t exchange,
    exports_legate_filter_http_handler_callout_id_t id,
    exports_legate_filter_http_handler_result_callout_response_error_t *response,
    exports_legate_filter_http_handler_action_t *ret) {
    (void)context, (void)exchange, (void)id;
    exports_legate_filter_http_handler_result_callout_response_error_free(response);
    ret->tag = LEGATE_FILTER_HTTP_ACTION_CONTINUE;
}

void exports_legate_filter_http_handler_on_done(uint64_t context) { (void)context; }
