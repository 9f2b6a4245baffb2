//! DNS messages as the resolver reads and writes them, on top of hickory-proto: the one
//! question of a query, the answers it synthesizes (REFUSED, NODATA, SERVFAIL), the query
//! as asked upstream (own id, 0x20) and the check of its answer, and what it takes from and
//! changes in an upstream's answer (the agent's id and question back, addresses along the
//! CNAME chain, TTL caps, truncation for UDP).

use std::{collections::BTreeMap, net::IpAddr};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query as Question, ResponseCode},
    rr::{Name, RData, RecordType},
    serialize::binary::BinEncodable,
};

/// Why a message could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    /// Not a DNS message at all (no answer can even carry its id).
    #[error("malformed DNS message: {0}")]
    Malformed(String),
    /// A DNS message, but not a single-question standard query.
    #[error("unsupported query: {0}")]
    Unsupported(&'static str),
}

/// A query the resolver accepted: the parsed message and its one question.
#[derive(Debug, Clone)]
pub struct Query {
    /// The whole message, for building answers that echo it.
    pub message: Message,
    /// The question's name in the form the policy matches (lowercase, no trailing dot);
    /// `None` when it is not a valid host name (such a name matches no pattern).
    pub name: Option<String>,
    /// The question's name as sent, for messages and audit records.
    pub raw_name: String,
    /// The question's type.
    pub qtype: RecordType,
}

/// Parses a query. On error, returns the message id when the header could be read, so the
/// caller can still answer FORMERR or NOTIMP.
pub fn parse_query(bytes: &[u8]) -> Result<Query, (Option<u16>, MessageError)> {
    let id = (bytes.len() >= 2).then(|| u16::from_be_bytes([bytes[0], bytes[1]]));
    let message =
        Message::from_vec(bytes).map_err(|e| (id, MessageError::Malformed(e.to_string())))?;
    let reject = |why| Err((Some(message.metadata.id), MessageError::Unsupported(why)));
    if message.metadata.message_type != MessageType::Query {
        return reject("not a query");
    }
    if message.metadata.op_code != OpCode::Query {
        return reject("opcode other than QUERY");
    }
    let [question] = message.queries.as_slice() else {
        return reject("not exactly one question");
    };
    let raw_name = question.name.to_ascii();
    let name = crate::policy::normalize_name(&raw_name).ok();
    let qtype = question.query_type;
    Ok(Query {
        name,
        raw_name: raw_name.trim_end_matches('.').to_string(),
        qtype,
        message,
    })
}

/// An answer to `query` with `code` and no records (REFUSED, SERVFAIL, and with NOERROR
/// the NODATA answer).
pub fn empty_answer(query: &Message, code: ResponseCode) -> Message {
    let mut answer = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    answer.metadata.recursion_desired = query.metadata.recursion_desired;
    answer.metadata.recursion_available = true;
    answer.add_queries(query.queries.iter().cloned());
    answer
}

/// An error answer for a query that could not be parsed into a [`Query`].
pub fn error_for_id(id: u16, code: ResponseCode) -> Message {
    Message::error_msg(id, OpCode::Query, code)
}

/// Serializes a message the resolver built or edited. Failure means a record hickory could
/// parse but not write back, which the caller answers with SERVFAIL.
pub fn encode(message: &Message) -> Result<Vec<u8>, MessageError> {
    message
        .to_vec()
        .map_err(|e| MessageError::Malformed(e.to_string()))
}

/// Why a datagram from an upstream is not the answer to the query asked: the resolver
/// drops it, counts it and keeps waiting, so a forged datagram cannot end the wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// It came from another address or port than the query went to.
    Source,
    /// It does not parse as a DNS message.
    Malformed,
    /// It is a query, not a response.
    NotAResponse,
    /// Its id is not the query's.
    Id,
    /// Its question is not the query's (name, its letter case under 0x20, type, class).
    Question,
}

impl Rejected {
    /// The `reason` label of `enforcer_dns_upstream_answers_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::Source => "source",
            Rejected::Malformed => "malformed",
            Rejected::NotAResponse => "not_a_response",
            Rejected::Id => "id",
            Rejected::Question => "question",
        }
    }
}

/// Offset of the question's name: right after the 12-byte header (RFC 1035 4.1.1).
const QNAME: usize = 12;

/// One upstream attempt at an agent's query: the agent's bytes with an id of the
/// resolver's own and, under 0x20, the question name's letters in random case. An answer
/// forged by someone who sees only the agent's side (the agent itself, choosing its id)
/// must guess both, on top of the source port.
#[derive(Clone, Debug)]
pub struct UpstreamQuery {
    /// What goes on the wire.
    pub bytes: Vec<u8>,
    /// The id sent.
    pub id: u16,
    /// The question sent, its name in the case sent.
    pub question: Question,
    /// Whether the answer must echo the name byte for byte (0x20 on); without 0x20 an
    /// upstream that changes the case is still believed.
    pub exact_case: bool,
}

impl UpstreamQuery {
    /// Builds the attempt from `agent`, a query [`parse_query`] accepted, with `id`; with
    /// `case` (0x20, draft-vixie-dnsext-dns0x20), each letter of the question name takes its
    /// case from bit 0x20 of the byte of `case` at the letter's offset in the name.
    pub fn new(agent: &[u8], id: u16, case: Option<&[u8]>) -> Result<Self, MessageError> {
        let mut bytes = agent.to_vec();
        let header = bytes
            .get_mut(..2)
            .ok_or_else(|| MessageError::Malformed("no header".into()))?;
        header.copy_from_slice(&id.to_be_bytes());
        if let Some(case) = case {
            let name = name_at_qname(&bytes)
                .ok_or(MessageError::Unsupported("compressed or cut question name"))?;
            for (i, b) in bytes[QNAME..QNAME + name].iter_mut().enumerate() {
                // Length octets are below 64, never letters; a letter's case is its 0x20 bit.
                if b.is_ascii_alphabetic() {
                    *b = (*b & !0x20) | (case.get(i).copied().unwrap_or(0) & 0x20);
                }
            }
        }
        let message =
            Message::from_vec(&bytes).map_err(|e| MessageError::Malformed(e.to_string()))?;
        let [question] = <[Question; 1]>::try_from(message.queries)
            .map_err(|_| MessageError::Unsupported("not exactly one question"))?;
        Ok(UpstreamQuery {
            bytes,
            id,
            question,
            exact_case: case.is_some(),
        })
    }

    /// Checks that `answer` answers this attempt: a response with its id and its one
    /// question: type, class and name, the name byte for byte under 0x20.
    pub fn check(&self, answer: &Message) -> Result<(), Rejected> {
        if answer.metadata.message_type != MessageType::Response {
            return Err(Rejected::NotAResponse);
        }
        if answer.metadata.id != self.id {
            return Err(Rejected::Id);
        }
        let [question] = answer.queries.as_slice() else {
            return Err(Rejected::Question);
        };
        let same_name = if self.exact_case {
            question.name.eq_case(&self.question.name)
        } else {
            question.name == self.question.name
        };
        if !same_name
            || question.query_type != self.question.query_type
            || question.query_class != self.question.query_class
        {
            return Err(Rejected::Question);
        }
        Ok(())
    }
}

/// The length of the uncompressed name at [`QNAME`], its terminating zero included, or
/// `None` when it is compressed or runs past the end.
fn name_at_qname(bytes: &[u8]) -> Option<usize> {
    let mut at = QNAME;
    loop {
        let len = usize::from(*bytes.get(at)?);
        if len & 0xC0 != 0 {
            return None;
        }
        at += 1 + len;
        if len == 0 {
            return (at <= bytes.len()).then_some(at - QNAME);
        }
    }
}

/// Gives the agent its own id and question back in an upstream's answer, the name in the
/// agent's letter case, also where it owns records. `answer` is the parsed answer; `raw`
/// (the bytes as received, relayed as they are to agents without names) gets the id, and
/// the name when it is written in full right after the header, as servers write it:
/// compressed owner names point there.
pub fn restore(answer: &mut Message, raw: &mut [u8], agent: &Message) {
    answer.metadata.id = agent.metadata.id;
    if let Some(original) = agent.queries.first() {
        for record in answer
            .answers
            .iter_mut()
            .chain(answer.authorities.iter_mut())
            .chain(answer.additionals.iter_mut())
        {
            if record.name == original.name {
                record.name = original.name.clone();
            }
        }
    }
    answer.queries.clone_from(&agent.queries);
    if let Some(header) = raw.get_mut(..2) {
        header.copy_from_slice(&agent.metadata.id.to_be_bytes());
    }
    let wire = agent.queries.first().and_then(|q| q.name.to_bytes().ok());
    if let (Some(wire), Some(len)) = (wire, name_at_qname(raw))
        && len == wire.len()
        && raw[QNAME..QNAME + len].eq_ignore_ascii_case(&wire)
    {
        raw[QNAME..QNAME + len].copy_from_slice(&wire);
    }
}

fn key(name: &Name) -> String {
    name.to_ascii().to_ascii_lowercase()
}

/// The addresses an answer gives for `question`: A and AAAA records owned by the question
/// name or by a name the answer's CNAME chain leads to from it, each with the smallest TTL
/// along its chain (the address is valid for the question only while every link is).
/// Records for other names (glue, stray data) are ignored.
pub fn addresses(question: &Name, answer: &Message) -> Vec<(IpAddr, u32)> {
    // Name → smallest TTL of the chain reaching it. Bounded by the number of CNAMEs, so a
    // loop in the chain ends.
    let mut chain: BTreeMap<String, u32> = BTreeMap::from([(key(question), u32::MAX)]);
    for _ in 0..=answer.answers.len() {
        let mut grew = false;
        for record in &answer.answers {
            if let RData::CNAME(target) = &record.data
                && let Some(&ttl) = chain.get(&key(&record.name))
            {
                let ttl = ttl.min(record.ttl);
                let slot = chain.entry(key(&target.0)).or_insert(u32::MAX);
                if ttl < *slot {
                    *slot = ttl;
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    let mut out = Vec::new();
    for record in &answer.answers {
        let addr = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if let Some(&ttl) = chain.get(&key(&record.name)) {
            out.push((addr, ttl.min(record.ttl)));
        }
    }
    out
}

/// Caps every record's TTL at `max_ttl`, so no cache of the agent's keeps an address
/// longer than the enforcer admits it. The OPT pseudo-record is not a record here
/// (hickory keeps it apart), so its flags are untouched.
pub fn cap_ttls(answer: &mut Message, max_ttl: u32) {
    for record in answer
        .answers
        .iter_mut()
        .chain(answer.authorities.iter_mut())
        .chain(answer.additionals.iter_mut())
    {
        record.ttl = record.ttl.min(max_ttl);
    }
}

/// The answer as sent over UDP to a client that advertised `max_payload` bytes (512 without
/// EDNS): the full answer when it fits, else the header and question with TC set, so the
/// client asks again over TCP.
pub fn fit_udp(
    answer: &Message,
    bytes: Vec<u8>,
    max_payload: u16,
) -> Result<Vec<u8>, MessageError> {
    if bytes.len() <= usize::from(max_payload.max(512)) {
        return Ok(bytes);
    }
    encode(&answer.truncate())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::{
        op::Query as Question,
        rr::{
            Record,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;

    pub(crate) fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Question::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn parses_one_question_and_normalizes_its_name() {
        let q = parse_query(&query_bytes(7, "API.Example.Test.", RecordType::A)).unwrap();
        assert_eq!(q.name.as_deref(), Some("api.example.test"));
        assert_eq!(q.raw_name, "API.Example.Test");
        assert_eq!(q.qtype, RecordType::A);
        assert_eq!(q.message.metadata.id, 7);
    }

    #[test]
    fn rejects_what_is_not_a_single_standard_query() {
        assert!(matches!(
            parse_query(&[1, 2, 3]),
            Err((Some(0x0102), MessageError::Malformed(_)))
        ));
        assert!(matches!(
            parse_query(&[1]),
            Err((None, MessageError::Malformed(_)))
        ));
        let mut two = Message::new(9, MessageType::Query, OpCode::Query);
        two.add_query(Question::query(n("a.test."), RecordType::A));
        two.add_query(Question::query(n("b.test."), RecordType::A));
        assert_eq!(
            parse_query(&two.to_vec().unwrap()).unwrap_err(),
            (
                Some(9),
                MessageError::Unsupported("not exactly one question")
            )
        );
        let response = Message::response(3, OpCode::Query).to_vec().unwrap();
        assert_eq!(
            parse_query(&response).unwrap_err().1,
            MessageError::Unsupported("not a query")
        );
    }

    #[test]
    fn a_name_that_is_no_host_name_matches_nothing() {
        // On the wire a label may hold any byte; hickory's text parser would refuse this.
        let name = Name::from_labels([b"bad!name".as_slice(), b"test"]).unwrap();
        let mut m = Message::new(1, MessageType::Query, OpCode::Query);
        m.add_query(Question::query(name, RecordType::A));
        let q = parse_query(&m.to_vec().unwrap()).unwrap();
        assert_eq!(q.name, None);
    }

    #[test]
    fn empty_answers_echo_id_question_and_rd() {
        let q = parse_query(&query_bytes(42, "a.test.", RecordType::HTTPS)).unwrap();
        let a = empty_answer(&q.message, ResponseCode::Refused);
        let back = Message::from_vec(&encode(&a).unwrap()).unwrap();
        assert_eq!(back.metadata.id, 42);
        assert_eq!(back.metadata.response_code, ResponseCode::Refused);
        assert_eq!(back.metadata.message_type, MessageType::Response);
        assert!(back.metadata.recursion_desired);
        assert_eq!(back.queries, q.message.queries);
        assert!(back.answers.is_empty());
    }

    fn answer_with(records: Vec<Record>) -> Message {
        let mut m = Message::response(1, OpCode::Query);
        m.add_query(Question::query(n("www.a.test."), RecordType::A));
        m.add_answers(records);
        m
    }

    #[test]
    fn addresses_follow_the_cname_chain_with_its_smallest_ttl() {
        let m = answer_with(vec![
            Record::from_rdata(
                n("WWW.a.test."),
                30,
                RData::CNAME(CNAME(n("edge.cdn.test."))),
            ),
            Record::from_rdata(
                n("edge.cdn.test."),
                600,
                RData::CNAME(CNAME(n("e1.cdn.test."))),
            ),
            Record::from_rdata(
                n("e1.cdn.test."),
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ),
            Record::from_rdata(
                n("e1.cdn.test."),
                10,
                RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
            ),
            // Not on the chain: never admitted.
            Record::from_rdata(
                n("other.test."),
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 9))),
            ),
        ]);
        assert_eq!(
            addresses(&n("www.a.test."), &m),
            vec![
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 30),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 10)
            ]
        );
    }

    #[test]
    fn a_cname_loop_ends() {
        let m = answer_with(vec![
            Record::from_rdata(n("www.a.test."), 30, RData::CNAME(CNAME(n("x.test.")))),
            Record::from_rdata(n("x.test."), 30, RData::CNAME(CNAME(n("www.a.test.")))),
        ]);
        assert!(addresses(&n("www.a.test."), &m).is_empty());
    }

    #[test]
    fn ttls_are_capped_in_every_section() {
        let mut m = answer_with(vec![Record::from_rdata(
            n("www.a.test."),
            86_400,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        )]);
        m.add_additional(Record::from_rdata(
            n("ns.a.test."),
            7_200,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 2))),
        ));
        m.add_additional(Record::from_rdata(
            n("ns2.a.test."),
            5,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 3))),
        ));
        cap_ttls(&mut m, 3600);
        let ttls: Vec<u32> = m.all_sections().map(|r| r.ttl).collect();
        assert_eq!(ttls, vec![3600, 3600, 5]);
    }

    #[test]
    fn udp_answers_that_do_not_fit_are_truncated() {
        let records = (0..60)
            .map(|i| {
                Record::from_rdata(
                    n("www.a.test."),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
                )
            })
            .collect();
        let m = answer_with(records);
        let bytes = encode(&m).unwrap();
        assert!(bytes.len() > 512);
        let sent = fit_udp(&m, bytes.clone(), 512).unwrap();
        let back = Message::from_vec(&sent).unwrap();
        assert!(back.metadata.truncation);
        assert!(back.answers.is_empty());
        assert_eq!(back.queries, m.queries);
        assert_eq!(fit_udp(&m, bytes.clone(), 4096).unwrap(), bytes);
    }
}
