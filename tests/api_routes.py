"""Every route of the API, as (method, path): what the OpenAPI document must list."""

API_ROUTES = {
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("get", "/v1/models"),
    ("post", "/v1/infer"),
    ("post", "/v1/batch_infer"),
    ("post", "/v1/stream_infer"),
    ("get", "/v1/model_info"),
    ("get", "/health"),
    ("get", "/metrics"),
    ("post", "/tokenize"),
    ("post", "/detokenize"),
}
