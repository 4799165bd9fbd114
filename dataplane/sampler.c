/*
 * TW-LB's answer sampler: an Envoy HTTP filter, loaded as a dynamic module.
 *
 * On the route Envoy samples for audits (dataplane/resources.py), it copies the request's
 * head and the answer's body, as they pass, into the request's dynamic metadata
 * (namespace "twlb": keys "head" and "answer", base64), where the listener's sample
 * access log reads them and carries them to the control plane. It never holds a request
 * or an answer back: every hook answers Continue. An answer longer than the configured
 * limit is not kept (the access log then skips the request).
 *
 *   head:   the request's headers, "name\0value" joined by "\n" (pseudo-headers first)
 *   answer: the body's bytes, whole
 *
 * It does in C what a Lua script did, at a small share of its CPU per sampled answer
 * (docs/envoy.md, bench/envoy_sampler_bench.py).
 *
 * Envoy's dynamic-module ABI (Envoy 1.40, ABI v0.2.0): the module exports the event
 * hooks Envoy calls (envoy_dynamic_module_on_*) and calls the callbacks Envoy exports
 * (envoy_dynamic_module_callback_*), resolved when Envoy loads it. Only what this filter
 * uses is declared here, with the C types of Envoy's declarations. Built by
 * dataplane/module.py: cc -O2 -shared -fPIC.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- Envoy's types, as the ABI lays them out ------------------------------------ */

/* A run of bytes (Envoy's envoy_buffer and module_buffer: pointer and length). */
typedef struct {
  const char* ptr;
  size_t length;
} twlb_bytes;

/* One header (envoy_http_header: name, then value). */
typedef struct {
  const char* name;
  size_t name_length;
  const char* value;
  size_t value_length;
} twlb_header;

/* envoy_dynamic_module_type_http_header_type and _http_body_type. */
enum { TWLB_REQUEST_HEADERS = 0 };
enum { TWLB_RECEIVED_RESPONSE_BODY = 2 };
/* Every status enum's Continue. */
enum { TWLB_CONTINUE = 0 };

/* ---- The callbacks Envoy exports that this filter calls ------------------------- */

size_t envoy_dynamic_module_callback_http_get_headers_size(void* filter, int header_type);
bool envoy_dynamic_module_callback_http_get_headers(void* filter, int header_type,
                                                    twlb_header* headers);
size_t envoy_dynamic_module_callback_http_get_body_chunks_size(void* filter, int body_type);
bool envoy_dynamic_module_callback_http_get_body_chunks(void* filter, int body_type,
                                                        twlb_bytes* chunks);
void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(void* filter,
                                                                    twlb_bytes name_space,
                                                                    twlb_bytes key,
                                                                    twlb_bytes value);

/* ---- The sampler ---------------------------------------------------------------- */

static const twlb_bytes NS = {"twlb", 4};
static const twlb_bytes HEAD = {"head", 4};
static const twlb_bytes ANSWER = {"answer", 6};
#define DEFAULT_MAX_BODY ((size_t)1 << 20)

typedef struct {
  size_t max_body; /* the longest answer kept, in bytes */
} sampler_config;

typedef struct {
  const sampler_config* config;
  char* body;      /* the answer so far */
  size_t length;   /* its bytes */
  size_t capacity; /* what `body` holds */
  bool done;       /* the answer was stored, or given up */
} sampler;

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Base64 (RFC 4648, padded) of `in` into `out`, which holds 4 * ceil(n / 3) bytes. */
static size_t base64(const unsigned char* in, size_t n, char* out) {
  size_t o = 0, i = 0;
  for (; i + 2 < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
    out[o++] = B64[v >> 18];
    out[o++] = B64[(v >> 12) & 63];
    out[o++] = B64[(v >> 6) & 63];
    out[o++] = B64[v & 63];
  }
  if (i < n) {
    uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
    out[o++] = B64[v >> 18];
    out[o++] = B64[(v >> 12) & 63];
    out[o++] = i + 1 < n ? B64[(v >> 6) & 63] : '=';
    out[o++] = '=';
  }
  return o;
}

/* Store `n` bytes as the base64 value of `key` in the request's metadata. False when
 * memory ran out (nothing is stored then). */
static bool store(void* filter, twlb_bytes key, const char* bytes, size_t n) {
  char* encoded = malloc(4 * ((n + 2) / 3) + 1);
  if (encoded == NULL) return false;
  twlb_bytes value = {encoded, base64((const unsigned char*)bytes, n, encoded)};
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(filter, NS, key, value);
  free(encoded);
  return true;
}

static void store_head(void* filter) {
  size_t count = envoy_dynamic_module_callback_http_get_headers_size(filter, TWLB_REQUEST_HEADERS);
  if (count == 0) return;
  twlb_header* headers = calloc(count, sizeof(twlb_header));
  if (headers == NULL) return;
  if (envoy_dynamic_module_callback_http_get_headers(filter, TWLB_REQUEST_HEADERS, headers)) {
    size_t n = 0;
    for (size_t i = 0; i < count; i++) n += headers[i].name_length + headers[i].value_length + 2;
    char* head = malloc(n);
    if (head != NULL) {
      size_t o = 0;
      for (size_t i = 0; i < count; i++) {
        if (i > 0) head[o++] = '\n';
        memcpy(head + o, headers[i].name, headers[i].name_length);
        o += headers[i].name_length;
        head[o++] = '\0';
        memcpy(head + o, headers[i].value, headers[i].value_length);
        o += headers[i].value_length;
      }
      store(filter, HEAD, head, o);
      free(head);
    }
  }
  free(headers);
}

static void drop_body(sampler* s) {
  free(s->body);
  s->body = NULL;
  s->length = s->capacity = 0;
}

/* Append the chunks Envoy holds now (the answer's bytes that just arrived). */
static void keep_chunks(void* filter, sampler* s) {
  size_t count =
      envoy_dynamic_module_callback_http_get_body_chunks_size(filter, TWLB_RECEIVED_RESPONSE_BODY);
  if (count == 0) return;
  twlb_bytes small[8];
  twlb_bytes* chunks = count <= 8 ? small : calloc(count, sizeof(twlb_bytes));
  if (chunks == NULL) {
    s->done = true; /* cannot read the answer: give it up */
    drop_body(s);
    return;
  }
  if (envoy_dynamic_module_callback_http_get_body_chunks(filter, TWLB_RECEIVED_RESPONSE_BODY,
                                                         chunks)) {
    for (size_t i = 0; i < count && !s->done; i++) {
      size_t n = chunks[i].length;
      if (s->length + n > s->config->max_body) {
        s->done = true; /* too long to keep: not sampled */
        drop_body(s);
        break;
      }
      if (s->length + n > s->capacity) {
        size_t capacity = s->capacity ? s->capacity : 4096;
        while (capacity < s->length + n) capacity *= 2;
        char* grown = realloc(s->body, capacity);
        if (grown == NULL) {
          s->done = true;
          drop_body(s);
          break;
        }
        s->body = grown;
        s->capacity = capacity;
      }
      memcpy(s->body + s->length, chunks[i].ptr, n);
      s->length += n;
    }
  }
  if (chunks != small) free(chunks);
}

/* The answer is whole: store it (once). */
static void finish(void* filter, sampler* s) {
  if (s->done) return;
  s->done = true;
  store(filter, ANSWER, s->body ? s->body : "", s->length);
  drop_body(s);
}

/* ---- The hooks Envoy calls -------------------------------------------------------- */

const char* envoy_dynamic_module_on_program_init(void) { return "v0.2.0"; }

/* The filter's configuration: the longest answer kept, in bytes, as decimal digits
 * (empty: 1 MiB). NULL (Envoy then refuses the configuration) for anything else. */
const void* envoy_dynamic_module_on_http_filter_config_new(const void* config_envoy,
                                                           twlb_bytes name,
                                                           twlb_bytes config) {
  (void)config_envoy;
  (void)name;
  size_t max_body = DEFAULT_MAX_BODY;
  if (config.length > 0) {
    if (config.length > 12) return NULL;
    max_body = 0;
    for (size_t i = 0; i < config.length; i++) {
      char c = config.ptr[i];
      if (c < '0' || c > '9') return NULL;
      max_body = max_body * 10 + (size_t)(c - '0');
    }
  }
  sampler_config* made = malloc(sizeof(sampler_config));
  if (made == NULL) return NULL;
  made->max_body = max_body;
  return made;
}

void envoy_dynamic_module_on_http_filter_config_destroy(const void* config) {
  free((void*)config);
}

const void* envoy_dynamic_module_on_http_filter_new(const void* config, void* filter_envoy) {
  (void)filter_envoy;
  sampler* s = calloc(1, sizeof(sampler));
  if (s != NULL) s->config = config;
  return s;
}

void envoy_dynamic_module_on_http_filter_destroy(const void* filter) {
  sampler* s = (sampler*)filter;
  if (s == NULL) return;
  free(s->body);
  free(s);
}

int envoy_dynamic_module_on_http_filter_request_headers(void* filter_envoy, const void* filter,
                                                        bool end_of_stream) {
  (void)filter;
  (void)end_of_stream;
  store_head(filter_envoy);
  return TWLB_CONTINUE;
}

int envoy_dynamic_module_on_http_filter_response_headers(void* filter_envoy, const void* filter,
                                                         bool end_of_stream) {
  if (end_of_stream && filter != NULL) finish(filter_envoy, (sampler*)filter);
  return TWLB_CONTINUE;
}

int envoy_dynamic_module_on_http_filter_response_body(void* filter_envoy, const void* filter,
                                                      bool end_of_stream) {
  sampler* s = (sampler*)filter;
  if (s == NULL || s->done) return TWLB_CONTINUE;
  keep_chunks(filter_envoy, s);
  if (end_of_stream) finish(filter_envoy, s);
  return TWLB_CONTINUE;
}

int envoy_dynamic_module_on_http_filter_response_trailers(void* filter_envoy, const void* filter) {
  if (filter != NULL) finish(filter_envoy, (sampler*)filter);
  return TWLB_CONTINUE;
}

/* Hooks this filter has no use for (Envoy resolves every one when it loads a module).
 * Those without a result ignore whatever Envoy passes them. */
int envoy_dynamic_module_on_http_filter_request_body(void* e, const void* f, bool end) {
  (void)e, (void)f, (void)end;
  return TWLB_CONTINUE;
}
int envoy_dynamic_module_on_http_filter_request_trailers(void* e, const void* f) {
  (void)e, (void)f;
  return TWLB_CONTINUE;
}
int envoy_dynamic_module_on_http_filter_local_reply(void* e, const void* f, uint32_t code,
                                                    twlb_bytes details, bool reset_imminent) {
  (void)e, (void)f, (void)code, (void)details, (void)reset_imminent;
  return TWLB_CONTINUE;
}
void envoy_dynamic_module_on_http_filter_stream_complete(void* e, const void* f) {
  (void)e, (void)f;
}
void envoy_dynamic_module_on_http_filter_scheduled(void) {}
void envoy_dynamic_module_on_http_filter_http_callout_done(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_headers(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_data(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_trailers(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_complete(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_reset(void) {}
void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(void) {}
void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(void) {}
void envoy_dynamic_module_on_http_filter_config_scheduled(void) {}
void envoy_dynamic_module_on_http_filter_config_http_callout_done(void) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_headers(void) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_data(void) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_trailers(void) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_complete(void) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_reset(void) {}
const void* envoy_dynamic_module_on_http_filter_per_route_config_new(void) { return NULL; }
void envoy_dynamic_module_on_http_filter_per_route_config_destroy(void) {}
