//! The group routes of the business REST API (API.md section 3): management, membership,
//! group messages, history and read counts. Thin like `api`: requests in, store operations
//! out (membership changes with the announcement their completion queues to the shards,
//! `Shard::change_membership`), JSON back.
use std::rc::Rc;

use ether_http::request::{Method, Request};
use ether_http::response::Response;
use ether_proto::api::parse_request;
use ether_proto::ids::check_id;
use ether_proto::{ApiError, ErrorCode, Kind};
use ether_store::op::Op;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::api::{json, query_u64};
use crate::error::EngineError;
use crate::groups::{MembershipChange, NewGroupPost};
use crate::message::unix_now_ms;
use crate::message::MessageView;
use crate::shard::Shard;

/// Most members listed per page, and the default page.
pub const MEMBERS_PAGE_MAX: usize = 1000;
pub const MEMBERS_PAGE_DEFAULT: usize = 100;
/// The `from` of group messages the business sends without naming a member.
pub const SYSTEM_SENDER: &str = "system";
/// Longest group name, in bytes.
pub const GROUP_NAME_BYTES_MAX: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroup {
    #[serde(default)]
    id: Option<String>,
    name: String,
    owner: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMembers {
    members: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupMessage {
    #[serde(default)]
    from: Option<String>,
    kind: Kind,
    body: serde_json::Value,
    #[serde(default)]
    cid: Option<String>,
}

/// Checks a member list of a request: ids, and at most `max` distinct users together with
/// `owner` (a new group's owner is one of its members).
fn check_members(path: &str, members: &[String], owner: Option<&str>, max: usize) -> Result<(), EngineError> {
    // Duplicates are ignored (the store adds each user once), so they do not count.
    let listed = members.len() + usize::from(owner.is_some());
    let distinct = if listed > max {
        members.iter().map(String::as_str).chain(owner).collect::<std::collections::HashSet<_>>().len()
    } else {
        listed
    };
    if distinct > max {
        let owner_too = if owner.is_some() { ", the owner included" } else { "" };
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            format!("{path}: at most {max} members{owner_too} (limits.group_members_max), got {distinct}"),
        )
        .into());
    }
    for (i, m) in members.iter().enumerate() {
        check_id(&format!("{path}[{i}]"), m)?;
    }
    Ok(())
}

/// A membership limit the store refused a creation or an addition for, named by its
/// configuration key (the store's message says only the number): the key to raise.
fn name_the_limit(e: EngineError, members_max: usize, groups_per_user_max: usize) -> EngineError {
    match e {
        EngineError::Store(ether_store::StoreError::LimitExceeded(m)) => {
            let key = if m.starts_with("groups per user") {
                format!("limits.groups_per_user_max = {groups_per_user_max}")
            } else {
                format!("limits.group_members_max = {members_max}")
            };
            ApiError::new(ErrorCode::InvalidBody, format!("limit exceeded: {m} ({key})")).into()
        }
        other => other,
    }
}

/// Routes `/v1/groups/...` and `GET /v1/users/{uid}/groups`; `None` when the path is not one.
pub async fn route(shard: &Rc<Shard>, req: &Request, segments: &[&str]) -> Option<Result<Response, EngineError>> {
    Some(match (crate::api::routed_method(&req.method), segments) {
        (Method::Post, ["v1", "groups"]) => create(shard, req).await,
        (Method::Get, ["v1", "groups", gid]) => get(shard, gid).await,
        (Method::Delete, ["v1", "groups", gid]) => dissolve(shard, gid).await,
        (Method::Post, ["v1", "groups", gid, "members"]) => add_members(shard, gid, req).await,
        (Method::Get, ["v1", "groups", gid, "members"]) => list_members(shard, gid, req).await,
        (Method::Delete, ["v1", "groups", gid, "members", uid]) => remove_member(shard, gid, uid).await,
        (Method::Post, ["v1", "groups", gid, "messages"]) => send(shard, gid, req).await,
        (Method::Get, ["v1", "groups", gid, "messages"]) => history(shard, gid, req).await,
        (Method::Get, ["v1", "groups", gid, "messages", id, "reads"]) => reads(shard, gid, id).await,
        (Method::Get, ["v1", "users", uid, "groups"]) => groups_of(shard, uid).await,
        // A route that exists, asked with another method.
        (_, ["v1", "groups"])
        | (_, ["v1", "groups", _])
        | (_, ["v1", "groups", _, "members" | "messages"])
        | (_, ["v1", "groups", _, "members", _])
        | (_, ["v1", "groups", _, "messages", _, "reads"])
        | (_, ["v1", "users", _, "groups"]) => {
            Err(ApiError::new(ErrorCode::MethodNotAllowed, format!("{} is not allowed on {}", req.method, req.path))
                .into())
        }
        _ => return None,
    })
}

async fn create(shard: &Rc<Shard>, req: &Request) -> Result<Response, EngineError> {
    let c: CreateGroup = parse_request(&req.body)?;
    if let Some(id) = &c.id {
        check_id("id", id)?;
    }
    check_id("owner", &c.owner)?;
    if c.name.is_empty() || c.name.len() > GROUP_NAME_BYTES_MAX {
        return Err(ApiError::new(ErrorCode::InvalidBody, format!("name: 1-{GROUP_NAME_BYTES_MAX} bytes")).into());
    }
    let max = shard.config.limits.group_members_max;
    let groups_max = shard.config.limits.groups_per_user_max;
    check_members("members", &c.members, Some(&c.owner), max)?;
    let op = Op::CreateGroup {
        id: c.id,
        name: c.name,
        owner: c.owner.clone(),
        members: c.members.clone(),
        created_ms: unix_now_ms(),
        members_max: max,
        groups_per_user_max: groups_max,
    };
    let mut joined = c.members;
    joined.push(c.owner);
    joined.sort();
    joined.dedup();
    let announce = move |reply: &ether_store::Reply| match reply {
        ether_store::Reply::GroupCreated { id } => {
            Some(MembershipChange::Members { group: id.clone(), users: joined, joined: true })
        }
        _ => None,
    };
    let created = shard.change_membership(op, announce).await.map_err(|e| name_the_limit(e.into(), max, groups_max));
    let id = match created? {
        ether_store::Reply::GroupCreated { id } => id,
        other => return Err(EngineError::Store(ether_store::StoreError::Internal(format!("unexpected {other:?}")))),
    };
    Ok(json(201, &json!({ "id": id })))
}

async fn get(shard: &Rc<Shard>, gid: &str) -> Result<Response, EngineError> {
    check_id("gid", gid)?;
    let g = shard.store.call(Op::GetGroup { group: gid.to_owned() }).await?.group()?;
    Ok(json(
        200,
        &json!({ "id": g.id, "name": g.name, "owner": g.owner, "member_count": g.member_count, "seq": g.seq, "created": g.created_ms }),
    ))
}

async fn dissolve(shard: &Rc<Shard>, gid: &str) -> Result<Response, EngineError> {
    check_id("gid", gid)?;
    let gone = MembershipChange::Gone { group: gid.to_owned() };
    shard.change_membership(Op::DissolveGroup { group: gid.to_owned() }, |_| Some(gone)).await?;
    Ok(json(200, &json!({ "dissolved": true })))
}

async fn add_members(shard: &Rc<Shard>, gid: &str, req: &Request) -> Result<Response, EngineError> {
    check_id("gid", gid)?;
    let a: AddMembers = parse_request(&req.body)?;
    let max = shard.config.limits.group_members_max;
    let groups_max = shard.config.limits.groups_per_user_max;
    check_members("members", &a.members, None, max)?;
    let op = Op::AddMembers {
        group: gid.to_owned(),
        users: a.members.clone(),
        members_max: max,
        groups_per_user_max: groups_max,
    };
    let change = MembershipChange::Members { group: gid.to_owned(), users: a.members, joined: true };
    let added = shard
        .change_membership(op, |_| Some(change))
        .await
        .map_err(|e| name_the_limit(e.into(), max, groups_max))?
        .count()?;
    Ok(json(200, &json!({ "added": added })))
}

async fn remove_member(shard: &Rc<Shard>, gid: &str, uid: &str) -> Result<Response, EngineError> {
    check_id("gid", gid)?;
    check_id("uid", uid)?;
    // The owner is always a member (docs/openapi.json): a group without its owner in it would
    // name as owner someone who can neither send to it nor read it. (No call changes a
    // group's owner: only a dissolution and a new group of the same id between this look
    // and the removal below could make them disagree.)
    let g = shard.store.call(Op::GetGroup { group: gid.to_owned() }).await?.group()?;
    if g.owner == uid {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("{uid} owns group {gid} and is always a member of it: dissolve the group instead"),
        )
        .into());
    }
    let op = Op::RemoveMember { group: gid.to_owned(), user: uid.to_owned() };
    let change = MembershipChange::Members { group: gid.to_owned(), users: vec![uid.to_owned()], joined: false };
    let removed = shard.change_membership(op, |_| Some(change)).await?.count()?;
    Ok(json(200, &json!({ "removed": removed })))
}

async fn list_members(shard: &Rc<Shard>, gid: &str, req: &Request) -> Result<Response, EngineError> {
    check_id("gid", gid)?;
    crate::api::check_query(req, &["cursor", "limit"])?;
    let limit = query_u64(req, "limit")?.map_or(MEMBERS_PAGE_DEFAULT, |l| l as usize);
    if limit == 0 || limit > MEMBERS_PAGE_MAX {
        return Err(ApiError::new(ErrorCode::InvalidBody, format!("query.limit: 1-{MEMBERS_PAGE_MAX}")).into());
    }
    let op = Op::ListMembers { group: gid.to_owned(), cursor: req.query_param("cursor"), limit };
    match shard.store.call(op).await? {
        ether_store::Reply::Members { members, next_cursor } => {
            Ok(json(200, &json!({ "members": members, "next_cursor": next_cursor })))
        }
        other => Err(EngineError::Store(ether_store::StoreError::Internal(format!("unexpected {other:?}")))),
    }
}

async fn groups_of(shard: &Rc<Shard>, uid: &str) -> Result<Response, EngineError> {
    check_id("uid", uid)?;
    let groups = shard.store.call(Op::GroupsOf { user: uid.to_owned() }).await?.groups()?;
    Ok(json(200, &json!({ "groups": groups })))
}

#[derive(Serialize)]
struct Sent {
    id: String,
    seq: u64,
    ts: u64,
}

async fn send(shard: &Rc<Shard>, gid: &str, req: &Request) -> Result<Response, EngineError> {
    check_id("gid", gid)?;
    let m: GroupMessage = parse_request(&req.body)?;
    // Without `from`, the business sends as the system: no membership needed.
    let (from, system) = match m.from {
        Some(from) => {
            check_id("from", &from)?;
            (from, false)
        }
        None => (SYSTEM_SENDER.to_owned(), true),
    };
    if let Some(cid) = &m.cid {
        if cid.is_empty() || cid.len() > ether_proto::api::CID_LEN_MAX {
            return Err(ApiError::new(ErrorCode::InvalidBody, "cid: 1-128 bytes").into());
        }
    }
    ether_proto::body::validate("body", m.kind, &m.body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidBody, e.to_string()))?;
    let body = serde_json::value::to_raw_value(&m.body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("body: {e}")))?;
    let post =
        NewGroupPost { from: from.into(), system, group: gid.into(), kind: m.kind, body, cid: m.cid.map(Into::into) };
    let sent = shard.send_group(post).await?;
    Ok(json(200, &Sent { id: sent.id.to_string(), seq: sent.seq, ts: sent.ts }))
}

/// A page of stored entries as `{messages, more, scanned_to}` (`scanned_to`: where to go on
/// from, also when a filtered page found nothing in the positions it may scan).
pub fn page_json(page: &ether_store::op::Page) -> Response {
    let bodies: Vec<Box<RawValue>> = page
        .entries
        .iter()
        .map(|e| RawValue::from_string(e.body.clone()).unwrap_or_else(|_| Box::<RawValue>::default()))
        .collect();
    let ids: Vec<String> = page.entries.iter().map(|e| e.id.to_string()).collect();
    let messages: Vec<MessageView> = page
        .entries
        .iter()
        .zip(bodies.iter().zip(&ids))
        .map(|(e, (body, id))| MessageView {
            ty: None,
            id,
            cid: e.cid.as_deref(),
            chat: &e.chat,
            from: &e.from,
            seq: e.seq,
            kind: e.kind,
            body,
            ts: e.ts,
        })
        .collect();
    json(200, &json!({ "messages": messages, "more": page.more, "scanned_to": page.scanned_to }))
}

async fn history(shard: &Rc<Shard>, gid: &str, req: &Request) -> Result<Response, EngineError> {
    check_id("gid", gid)?;
    crate::api::check_query(req, &["before_seq", "after_seq", "limit"])?;
    let limit = crate::api::history_limit(req)?;
    let op = Op::GroupHistory {
        group: gid.to_owned(),
        before_seq: query_u64(req, "before_seq")?,
        after_seq: query_u64(req, "after_seq")?,
        limit,
    };
    let page = shard.store.call(op).await?.page()?;
    Ok(page_json(&page))
}

async fn reads(shard: &Rc<Shard>, gid: &str, id: &str) -> Result<Response, EngineError> {
    check_id("gid", gid)?;
    let msg_id: u64 =
        id.parse().map_err(|_| ApiError::new(ErrorCode::InvalidBody, format!("id: {id:?} is not a message id")))?;
    match shard.store.call(Op::GroupReads { group: gid.to_owned(), msg_id }).await? {
        ether_store::Reply::Reads { read, members } => Ok(json(200, &json!({ "read": read, "members": members }))),
        other => Err(EngineError::Store(ether_store::StoreError::Internal(format!("unexpected {other:?}")))),
    }
}
