//! The server's integration tests in one binary (one link, one copy of the platform on disk):
//! `api` (REST, GraphQL, the gateway, billing and jobs on an all-in-one platform) and
//! `scaled_out` (a dispatcher and an API process over PostgreSQL and NATS JetStream). Live mode's
//! test stays a binary of its own: it sets the feed credentials in the environment, which is
//! sound only in a process where nothing else runs.

mod api;
mod scaled_out;
