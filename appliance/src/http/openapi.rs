//! The API's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! annotations and the types' `ToSchema` derives, built once and served at
//! `/api/v1/openapi.json`. `appliance/openapi.json` is a pretty-printed copy, checked by
//! `tests/openapi.rs`.
//!
//! utoipa (with utoipa-axum for axum 0.8) rather than aide: its derives read the `serde`
//! attributes we already have, and its router registers a handler and its documentation in
//! one call, so a route cannot be added undocumented.

use std::sync::LazyLock;

use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{
    AdditionalProperties, Object, ObjectBuilder, OneOfBuilder, Schema, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, InfoBuilder, LicenseBuilder, OpenApi, RefOr, ServerBuilder, Tag};
use utoipa::{PartialSchema, ToResponse, ToSchema};

use stork_proto::api::Counters;

const DESCRIPTION: &str = "Machines, their lifecycle and events, SSH keys, boot resources \
    and tokens. Every route needs an API bearer token (`stork token create`) unless it says \
    otherwise: a `read-only` token may read, an `operator` token may also change machines, \
    images and keys, an `admin` token may also manage tokens and read the audit log (a token \
    of too small a scope gets 403; a revoked or expired one 401); agent routes need the machine's current per-boot agent token (from its iPXE \
    script at `/ipxe/<mac>`, outside this API). Errors are JSON `{code, message}`; an illegal \
    transition is 409 and is recorded in the machine's history. Request bodies are strict: \
    unknown fields are a 400 naming the field.";

const TAGS: [&str; 7] = [
    "machines", "events", "ssh-keys", "images", "tokens", "service", "agent",
];

/// The document, built once from the routes.
pub fn document() -> &'static OpenApi {
    static DOC: LazyLock<OpenApi> = LazyLock::new(build);
    &DOC
}

/// The document as served and as committed: pretty-printed JSON with a final newline.
pub fn document_json() -> &'static str {
    static JSON: LazyLock<String> = LazyLock::new(|| {
        let mut s = serde_json::to_string_pretty(document()).unwrap_or_default();
        s.push('\n');
        s
    });
    &JSON
}

fn build() -> OpenApi {
    let (_, mut doc) = super::api::documented_routes().split_for_parts();
    doc.info = InfoBuilder::new()
        .title("Stork appliance API")
        .version("1")
        .description(Some(DESCRIPTION))
        .license(Some(
            LicenseBuilder::new()
                .name("Apache-2.0")
                .identifier(Some("Apache-2.0"))
                .build(),
        ))
        .build();
    doc.servers = Some(vec![ServerBuilder::new().url("/api/v1").build()]);
    doc.security = Some(vec![SecurityRequirement::new(
        "adminToken",
        Vec::<String>::new(),
    )]);
    // `security(())` writes `[{}]` (an anonymous alternative); the routes that need no token
    // have no requirement at all: `[]`.
    for item in doc.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for op in ops.into_iter().flatten() {
            if let Some(security) = &mut op.security {
                security
                    .retain(|r| serde_json::to_value(r).is_ok_and(|v| v != serde_json::json!({})));
            }
        }
    }
    doc.tags = Some(TAGS.iter().map(|t| Tag::new(*t)).collect());
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "adminToken",
        bearer(
            "An API token (`stork_admin_...`) of scope `read-only` (the GET routes), \
             `operator` (also changes to machines, images and keys) or `admin` (also tokens \
             and the audit log).",
        ),
    );
    components.add_security_scheme(
        "agentToken",
        bearer(
            "The machine's current per-boot agent token (`stork_agent_...`); good for that \
             machine only, revoked when its step ends.",
        ),
    );
    // Schemas named only through `schema_with` (the power parameters) and the shared error
    // answers.
    for (name, schema) in [
        (
            crate::power::ipmi::IpmiParams::name(),
            crate::power::ipmi::IpmiParams::schema(),
        ),
        (
            crate::power::redfish::RedfishParams::name(),
            crate::power::redfish::RedfishParams::schema(),
        ),
        (
            crate::power::qmp::QmpParams::name(),
            crate::power::qmp::QmpParams::schema(),
        ),
        (
            crate::power::ipmi::IpmiPrivilege::name(),
            crate::power::ipmi::IpmiPrivilege::schema(),
        ),
        // A query parameter's type: `params(...)` names it without registering it.
        (
            stork_proto::api::UploadFormat::name(),
            stork_proto::api::UploadFormat::schema(),
        ),
    ] {
        components.schemas.insert(name.into_owned(), schema);
    }
    // Fields whose schema the appliance knows better than the shared type: each power
    // driver's parameters, each service's counter names.
    for (schema, field, detail) in [
        ("PowerConfig", "params", power_params()),
        ("Stats", "dhcp", dhcp_stats().into()),
        ("Stats", "tftp", tftp_stats().into()),
        (
            "Stats",
            "dhcp6",
            counters(crate::dhcp6::Stats::default().snapshot()).into(),
        ),
        (
            "Stats",
            "http",
            counters(super::listener::HttpStats::default().snapshot()).into(),
        ),
    ] {
        if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(schema) {
            object.properties.insert(field.to_string(), detail.into());
        }
    }
    for (name, response) in [
        BadRequest::response(),
        Unauthorized::response(),
        Forbidden::response(),
        NotFound::response(),
        IllegalTransition::response(),
    ] {
        components.responses.insert(name.to_string(), response);
    }
    doc
}

fn bearer(description: &str) -> SecurityScheme {
    SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(description))
            .build(),
    )
}

// ---- schemas of types outside `http/` ----

/// `PowerConfig.params`: the driver's parameters.
pub fn power_params() -> Schema {
    use crate::power::{ipmi::IpmiParams, qmp::QmpParams, redfish::RedfishParams};
    let manual = ObjectBuilder::new()
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .description(Some("manual: none."));
    Schema::OneOf(
        OneOfBuilder::new()
            .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                IpmiParams::name(),
            )))
            .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                RedfishParams::name(),
            )))
            .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                QmpParams::name(),
            )))
            .item(manual)
            .description(Some(
                "The driver's parameters, checked when the machine is created. Values of \
                 secret parameters (names containing password, pass, secret, token or key) \
                 are stored but always returned as `***`.",
            ))
            .build(),
    )
}

/// A stats snapshot as the API's counters by name.
pub fn counter_map(snapshot: impl serde::Serialize) -> Counters {
    serde_json::to_value(snapshot)
        .and_then(serde_json::from_value)
        .unwrap_or_default()
}

/// An object of counters, named as the snapshot serialises them.
fn counters(snapshot: impl serde::Serialize) -> Object {
    let mut b = ObjectBuilder::new();
    for name in counter_map(snapshot).keys() {
        b = b
            .property(
                name,
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0)),
            )
            .required(name);
    }
    b.build()
}

pub fn dhcp_stats() -> Object {
    counters(crate::dhcp::Stats::default().snapshot())
}

pub fn tftp_stats() -> Object {
    counters(crate::tftp::Stats::default().snapshot())
}

// ---- what many routes share ----

/// The `{id}` of the admin routes under `/machines/{id}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Read by the document only: the handlers take the path as a String.
pub struct MachineId {
    /// Machine id, or any of its MAC addresses.
    id: String,
}

/// The `{id}` of the agent routes under `/agent/{id}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct AgentMachineId {
    /// The machine id from the boot script (`stork.machine`).
    id: String,
}

/// The answers of every lifecycle action (`/machines/{id}/commission`, `allocate`, ...).
pub struct ActionAnswers;

impl utoipa::IntoResponses for ActionAnswers {
    fn responses() -> std::collections::BTreeMap<String, RefOr<Response>> {
        let machine = ResponseBuilder::new()
            .description("The machine after the transition.")
            .content(
                "application/json",
                Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "Machine",
                )))),
            )
            .build();
        let shared = |name: &str| RefOr::Ref(utoipa::openapi::Ref::from_response_name(name));
        [
            ("200", RefOr::T(machine)),
            ("400", shared("BadRequest")),
            ("401", shared("Unauthorized")),
            ("403", shared("Forbidden")),
            ("404", shared("NotFound")),
            ("409", shared("IllegalTransition")),
        ]
        .into_iter()
        .map(|(status, r)| (status.to_string(), r))
        .collect()
    }
}

// ---- the error answers every route shares ----

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                "Error",
            )))),
        )
        .build()
}

macro_rules! error_responses {
    ($($name:ident: $description:literal,)*) => {
        $(
            pub struct $name;

            impl<'r> ToResponse<'r> for $name {
                fn response() -> (&'r str, RefOr<Response>) {
                    (stringify!($name), error_response($description).into())
                }
            }
        )*
    };
}

error_responses! {
    BadRequest: "Malformed JSON, an unknown or missing field, or a bad value; the message names the field.",
    Unauthorized: "No bearer token, or an unknown, expired or revoked one.",
    Forbidden: "A valid token of the wrong kind (an agent token on an admin route, an admin token on an agent route), an API token whose scope is too small, another machine's agent token, or an agent token used from another address than the one it was given to.",
    NotFound: "No such machine (or key).",
    IllegalTransition: "The lifecycle table does not allow this in the machine's status (`illegal_transition`); the refusal is recorded as an event.",
}
