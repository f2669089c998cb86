//! The DNS request handler: answers from the current [`RecordSet`], forwards other names.
//!
//! - In the cluster domain (and reverse names of cluster addresses): authoritative answers;
//!   NXDOMAIN or NODATA with the zone's SOA in the authority section.
//! - A CNAME (ExternalName Service) leaving the zone: the target is resolved upstream and its
//!   records appended, when upstreams are configured.
//! - Other names: forwarded to the upstreams, or REFUSED when there are none.
//! - Before the first record set is loaded: SERVFAIL. Only QUERY is implemented (NOTIMP).
use std::sync::{Arc, RwLock};

use hickory_proto::{
    op::{Edns, Header, HeaderCounts, Metadata, OpCode, Query, ResponseCode},
    rr::{DNSClass, Record},
};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};

use crate::{
    forward::Forwarder,
    records::{Lookup, RecordSet},
};

/// The record set answers come from; replaced whole on every rebuild.
#[derive(Clone, Default)]
pub struct Current(Arc<RwLock<Option<Arc<RecordSet>>>>);

impl Current {
    pub fn get(&self) -> Option<Arc<RecordSet>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, records: RecordSet) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(records));
    }
}

pub struct Handler {
    pub current: Current,
    pub forwarder: Forwarder,
}

/// What to send: response code, authoritative flag, and the sections.
struct Reply {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Reply {
    fn code(code: ResponseCode) -> Reply {
        Reply {
            code,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

impl Handler {
    async fn reply(&self, request: &Request) -> Reply {
        if request.metadata.op_code != OpCode::Query {
            return Reply::code(ResponseCode::NotImp);
        }
        let Ok(info) = request.request_info() else {
            return Reply::code(ResponseCode::FormErr);
        };
        let query = info.query;
        let Some(records) = self.current.get() else {
            return Reply::code(ResponseCode::ServFail);
        };
        let lookup = if query.query_class() == DNSClass::IN {
            records.lookup(query.name(), query.query_type())
        } else {
            Lookup::Outside
        };
        let negative = |code| Reply {
            code,
            authoritative: true,
            answers: Vec::new(),
            authorities: vec![records.soa().clone()],
            additionals: Vec::new(),
        };
        match lookup {
            Lookup::NxDomain => negative(ResponseCode::NXDomain),
            Lookup::NoData => negative(ResponseCode::NoError),
            Lookup::Answer { mut records, outside_target } => {
                if let Some(target) = outside_target
                    && !self.forwarder.is_empty()
                {
                    let mut target_query = Query::query(target, query.query_type());
                    target_query.set_query_class(query.query_class());
                    if let Ok(upstream) = self.forwarder.resolve(&target_query).await {
                        records.extend(upstream.answers.iter().cloned());
                    }
                }
                Reply {
                    answers: records,
                    authoritative: true,
                    ..Reply::code(ResponseCode::NoError)
                }
            }
            Lookup::Outside if self.forwarder.is_empty() => Reply::code(ResponseCode::Refused),
            Lookup::Outside => match self.forwarder.resolve(query.original()).await {
                Ok(upstream) => Reply {
                    code: upstream.metadata.response_code,
                    authoritative: false,
                    answers: upstream.answers.clone(),
                    authorities: upstream.authorities.clone(),
                    additionals: upstream.additionals.clone(),
                },
                Err(err) => {
                    log::warn!("forwarding {} failed: {err}", query.name());
                    Reply::code(ResponseCode::ServFail)
                }
            },
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let reply = self.reply(request).await;
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.code;
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = !self.forwarder.is_empty();
        let edns = request.edns.as_ref().map(|requested| {
            let mut edns = Edns::new();
            edns.set_max_payload(requested.max_payload().max(512));
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let response = builder.build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(err) => {
                log::debug!("sending a DNS response failed: {err}");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                Header { metadata, counts: HeaderCounts::default() }.into()
            }
        }
    }
}
