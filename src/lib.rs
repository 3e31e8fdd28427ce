//! stackwarden: a reconciling controller for AWS CloudFormation stacks and
//! the ECS services inside them.
//!
//! Layers, dependencies pointing down only:
//! `cli` -> `apply` -> `plan` / `diff` / `policy` (pure) -> `spec` -> `cloud`.

pub mod apply;
pub mod artifacts;
pub mod changeset;
pub mod cli;
pub mod cloud;
pub mod controller;
pub mod detect;
pub mod diff;
pub mod drift;
pub mod endpoints;
pub mod files;
pub mod git;
pub mod language_extensions;
pub mod lease;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod outcome;
pub mod plan;
pub mod policy;
pub mod recovery;
pub mod resource_types;
pub mod retry;
pub mod spec;
pub mod state;
pub mod status_page;
pub mod template;
pub mod window;
pub mod yaml;
