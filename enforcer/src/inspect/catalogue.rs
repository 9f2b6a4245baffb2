//! The shipped catalogue of secret formats: regex detectors the inspecting proxy adds when
//! the policy's `[dlp] catalogue` is `flag` or `block` (see [`crate::policy::Dlp`]).
//!
//! Every regex obeys the policy's rules for regex detectors (bytes, a literal start, a
//! bounded length; [`crate::policy::regex_shape`]), and every entry carries examples that
//! must match and near misses that must not; the table-driven test below feeds each
//! through the streaming scanner whole, byte by byte and split at every offset. The
//! examples are made up: format-valid, obviously fake (AWS's `AKIAIOSFODNN7EXAMPLE` and
//! Slack's `T00000000/B00000000` are their own documentation's examples).

use crate::policy::DetectorAction;

/// One secret format.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The detector's name in audit records, metrics and `[dlp] catalogue_except`.
    pub name: &'static str,
    /// The pattern (bytes; see [`crate::policy::regex_syntax_config`]).
    pub regex: &'static str,
    /// What a hit does when the catalogue is on in `block` mode. `flag` for formats that
    /// agents legitimately send to their own APIs.
    pub default_action: DetectorAction,
    /// Texts that must match.
    pub true_examples: &'static [&'static str],
    /// Near misses that must not match.
    pub false_examples: &'static [&'static str],
}

/// The catalogue, in the order its entries are searched (and reported, for one read).
pub const CATALOGUE: &[Entry] = &[
    Entry {
        name: "aws-access-key-id",
        regex: r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
        default_action: DetectorAction::Block,
        true_examples: &["AKIAIOSFODNN7EXAMPLE", "ASIAZZZZ0000FAKE1234"],
        false_examples: &[
            "AKIAIOSFODNN7EXAMPL",
            "AKIAIOSFODNN7EXAMPLE1",
            "xAKIAIOSFODNN7EXAMPLE",
            "AKIAiosfodnn7example",
            "AKIBIOSFODNN7EXAMPLE",
        ],
    },
    Entry {
        name: "aws-secret-access-key",
        regex: r#"(?i)aws_?secret_?access_?key["']?\s{0,4}[:=]\s{0,4}["']?[A-Za-z0-9/+]{40}"#,
        default_action: DetectorAction::Block,
        true_examples: &[
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            r#""AWS_SECRET_ACCESS_KEY": "FAKEfake0000FAKEfake1111FAKEfake2222FAKE""#,
            "AwsSecretAccessKey=FAKE+fake/0000FAKE+fake/1111FAKE+fake/22",
        ],
        false_examples: &[
            "aws_secret_access_key = short/key",
            "aws_secret_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKE.",
            "aws_secret_access_key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ],
    },
    Entry {
        name: "gcp-api-key",
        regex: r"AIza[0-9A-Za-z_-]{35}",
        default_action: DetectorAction::Block,
        true_examples: &[
            "AIzaFAKE-fake_0123FAKE-fake_0123FAKE-fa",
            "AIzaExample-Key_9Example-Key_9Example-K",
        ],
        false_examples: &[
            "AIzaFAKE-fake_0123FAKE-fake_0123FAKE-f",
            "aizaFAKE-fake_0123FAKE-fake_0123FAKE-fa",
            "AIzbFAKE-fake_0123FAKE-fake_0123FAKE-fa",
        ],
    },
    Entry {
        name: "gcp-service-account",
        regex: r#""type":\s{0,4}"service_account""#,
        default_action: DetectorAction::Block,
        true_examples: &[
            r#"{"type": "service_account", "project_id": "demo-fake"}"#,
            r#"{"type":"service_account"}"#,
        ],
        false_examples: &[
            r#"{"type": "user_account"}"#,
            r#"{"type" : "service_account"}"#,
            r#"{'type': 'service_account'}"#,
        ],
    },
    Entry {
        name: "azure-storage-key",
        regex: r"AccountKey=[A-Za-z0-9+/]{86}==",
        default_action: DetectorAction::Block,
        true_examples: &[
            concat!(
                "DefaultEndpointsProtocol=https;AccountName=fake;AccountKey=",
                "FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/",
                "FAKEfake0123+/FA==;EndpointSuffix=core.windows.net"
            ),
            concat!(
                "AccountKey=",
                "ExAmPlE0ExAmPlE0ExAmPlE0ExAmPlE0ExAmPlE0ExAmPlE0ExAmPlE0ExAmPlE0ExAmPlE0",
                "ExAmPlE0ExAmPl=="
            ),
        ],
        false_examples: &[
            concat!(
                "AccountKey=",
                "FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/",
                "FAKEfake0123+/F=="
            ),
            concat!(
                "accountkey=",
                "FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/",
                "FAKEfake0123+/FA=="
            ),
            concat!(
                "AccountKey=",
                "FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/FAKEfake0123+/",
                "FAKEfake0123+/FA;"
            ),
        ],
    },
    Entry {
        name: "github-token",
        regex: r"\bgh[pousr]_[A-Za-z0-9]{36}\b",
        default_action: DetectorAction::Block,
        true_examples: &[
            "ghp_FAKEfake0123FAKEfake0123FAKEfake0123",
            "ghs_Zz9Yy8Xx7Ww6Zz9Yy8Xx7Ww6Zz9Yy8Xx7Ww6",
        ],
        false_examples: &[
            "ghx_FAKEfake0123FAKEfake0123FAKEfake0123",
            "ghp_FAKEfake0123FAKEfake0123FAKEfake012",
            "ghp_FAKEfake0123FAKEfake0123FAKEfake01234",
            "xghp_FAKEfake0123FAKEfake0123FAKEfake0123",
            "GHP_FAKEfake0123FAKEfake0123FAKEfake0123",
        ],
    },
    Entry {
        name: "github-fine-grained-pat",
        regex: r"\bgithub_pat_[A-Za-z0-9_]{82}\b",
        default_action: DetectorAction::Block,
        true_examples: &[
            concat!(
                "github_pat_",
                "FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_",
                "FAKE_fa"
            ),
            concat!(
                "github_pat_",
                "ExAmPlE0_ExAmPlE0_ExAmPlE0_ExAmPlE0_ExAmPlE0_ExAmPlE0_ExAmPlE0_ExAmPlE0_",
                "ExAmPlE0_E"
            ),
        ],
        false_examples: &[
            concat!(
                "github_pat_",
                "FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_",
                "FAKE_f"
            ),
            concat!(
                "github_pat_",
                "FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_",
                "FAKE_fak"
            ),
            concat!(
                "github-pat-",
                "FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_FAKE_fake_0123_",
                "FAKE_fa"
            ),
        ],
    },
    Entry {
        name: "gitlab-pat",
        regex: r"glpat-[A-Za-z0-9_-]{20}",
        default_action: DetectorAction::Block,
        true_examples: &["glpat-FAKE-fake_0123FAKE-f", "glpat-xxxxYYYYxxxxYYYYxxxx"],
        false_examples: &[
            "glpat-FAKE-fake_0123FAKE-",
            "glpat_FAKE-fake_0123FAKE-f",
            "GLPAT-FAKE-fake_0123FAKE-f",
        ],
    },
    Entry {
        name: "slack-token",
        regex: r"xox[abposr]-[0-9A-Za-z-]{10,250}",
        default_action: DetectorAction::Block,
        true_examples: &[
            "xoxb-0000000000-0000000000-FAKEfakeFAKEfakeFAKEfake",
            "xoxp-1111111111-FAKE",
        ],
        false_examples: &[
            "xoxz-0000000000-FAKE",
            "xoxb-000000000",
            "XOXB-0000000000-FAKE",
        ],
    },
    Entry {
        name: "slack-webhook",
        regex: r"https://hooks\.slack\.com/services/T[A-Z0-9]{8,12}/B[A-Z0-9]{8,12}/[A-Za-z0-9]{24}",
        default_action: DetectorAction::Block,
        true_examples: &[
            "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
            "https://hooks.slack.com/services/TFAKE0001/BFAKE00002/fakeFAKEfakeFAKEfakeFAKE",
        ],
        false_examples: &[
            "http://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
            "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX",
            "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXX",
            "https://hooks.slack.com/workflows/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        ],
    },
    Entry {
        name: "stripe-live-key",
        regex: r"[sr]k_live_[0-9A-Za-z]{24,99}",
        default_action: DetectorAction::Block,
        true_examples: &[
            "sk_live_FAKEfake0000FAKEfake0000",
            "rk_live_Example1234Example1234Example1",
        ],
        false_examples: &[
            "sk_test_FAKEfake0000FAKEfake0000",
            "sk_live_FAKEfake0000FAKEfake000",
            "SK_LIVE_FAKEfake0000FAKEfake0000",
        ],
    },
    Entry {
        name: "openai-api-key",
        // Only up to the marker every key carries: what follows it adds nothing to the
        // evidence, and a counted repetition after an ambiguous marker would multiply the
        // DFA's states.
        regex: r"sk-(proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,200}T3BlbkFJ",
        default_action: DetectorAction::Block,
        true_examples: &[
            "sk-FAKEfake0000FAKEfake00T3BlbkFJFAKEfake0000FAKEfake00",
            "sk-proj-FAKEfake_0-FAKEfake_0-FAKEfake_0-FAKEfakT3BlbkFJFAKEfake_0-FAKEfake_0-",
        ],
        false_examples: &[
            "sk-FAKEfake0000FAKEfake00FAKEfake0000FAKEfake00",
            "sk-FAKEfakeT3BlbkFJFAKEfake0000FAKEfake00",
            "sk-FAKEfake0000FAKEfake00T3BlbkFj",
        ],
    },
    Entry {
        name: "anthropic-api-key",
        regex: r"sk-ant-(api|admin)[0-9]{2}-[A-Za-z0-9_-]{80,120}",
        default_action: DetectorAction::Block,
        true_examples: &[
            concat!(
                "sk-ant-api03-",
                "FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123",
                "FAKE-fake_0123FAKE-f"
            ),
            concat!(
                "sk-ant-admin01-",
                "AbCd_EfGh-AbCd_EfGh-AbCd_EfGh-AbCd_EfGh-AbCd_EfGh-AbCd_EfGh-AbCd_EfGh-",
                "AbCd_EfGh-AbCd_EfGh-AbCd_EfGh-"
            ),
        ],
        false_examples: &[
            "sk-ant-api03-FAKE-fake_0123FAKE-fake_0123",
            concat!(
                "sk-ant-xyz03-",
                "FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123",
                "FAKE-fake_0123FAKE-f"
            ),
            concat!(
                "sk-ant-api3-",
                "FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123FAKE-fake_0123",
                "FAKE-fake_0123FAKE-f"
            ),
        ],
    },
    Entry {
        name: "private-key",
        regex: r"-----BEGIN ((RSA|EC|DSA|OPENSSH|ENCRYPTED|PGP) )?PRIVATE KEY( BLOCK)?-----",
        default_action: DetectorAction::Block,
        true_examples: &[
            "-----BEGIN RSA PRIVATE KEY-----\nMIIFAKEfakeFAKE\n-----END RSA PRIVATE KEY-----",
            "-----BEGIN PRIVATE KEY-----",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
        ],
        false_examples: &[
            "-----BEGIN PUBLIC KEY-----",
            "-----BEGIN CERTIFICATE-----",
            "-----BEGIN RSA PRIVATE KEY----",
            "-----BEGIN rsa private key-----",
        ],
    },
    Entry {
        name: "jwt",
        regex: r"eyJ[A-Za-z0-9_-]{8,1024}\.eyJ[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{16,1024}",
        default_action: DetectorAction::Block,
        true_examples: &[
            concat!(
                "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.",
                "eyJzdWIiOiJmYWtlLXVzZXIiLCJuYW1lIjoiRmFrZSJ9.",
                "ZmFrZS1zaWduYXR1cmUtMDAwMDAwMDA"
            ),
            "eyJGAKEFAKE0.eyJGAKEFAKE1.FAKEsignature0000",
        ],
        false_examples: &[
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJmYWtlIn0",
            "eyJGAKEFAKE0.eyJGAKEFAKE1.short",
            "eyJGAKE.eyJGAKEFAKE1.FAKEsignature0000",
            "eyJGAKEFAKE0.xyzGAKEFAKE1.FAKEsignature0000",
        ],
    },
    Entry {
        name: "bearer",
        regex: r"(?i)authorization:[ \t]{0,8}bearer[ \t]{1,8}[A-Za-z0-9._~+/-]{20,4096}={0,2}",
        // Agents send bearer tokens to their own APIs all the time: audit, do not block.
        default_action: DetectorAction::Flag,
        true_examples: &[
            "Authorization: Bearer FAKEtokenFAKEtoken0123456789",
            "authorization:bearer\tfake.token.abcdefghijklmnopqrstuvwxyz",
        ],
        false_examples: &[
            "Authorization: Basic ZmFrZTpmYWtlZmFrZWZha2VmYWtl",
            "Authorization: Bearer short-token",
            "Authorization: BearerFAKEtokenFAKEtoken0123456789",
        ],
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        inspect::dlp::Detectors,
        policy::{Detector, DetectorDirection, DetectorPattern, regex_shape},
    };

    fn compile(entry: &Entry, action: DetectorAction) -> Detectors {
        Detectors::new(&[Detector {
            name: entry.name.into(),
            pattern: DetectorPattern::Regex(entry.regex.into()),
            action,
            direction: DetectorDirection::Both,
        }])
        .unwrap_or_else(|e| panic!("{}: {e}", entry.name))
    }

    /// Feeds `chunks` then finishes: what was forwarded, how many flags, and the block.
    fn run(d: &Detectors, chunks: &[&[u8]]) -> (Vec<u8>, usize, Option<usize>) {
        let (out, flags, block) = crate::inspect::dlp::tests::run_to_end(d, chunks);
        (out, flags.len(), block)
    }

    /// The ways a text is cut into reads: whole, byte by byte, and in two at every offset.
    fn cuts(text: &[u8]) -> Vec<Vec<&[u8]>> {
        let mut all = vec![vec![text], text.chunks(1).collect()];
        all.extend((0..=text.len()).map(|i| vec![&text[..i], &text[i..]]));
        all
    }

    const BEFORE: &str = "POST /upload HTTP/1.1\r\n\r\npayload: ";
    const AFTER: &str = " end\r\n";

    #[test]
    fn every_entry_is_a_valid_streaming_regex_with_examples() {
        let mut names = std::collections::HashSet::new();
        for e in CATALOGUE {
            assert!(names.insert(e.name), "{} twice", e.name);
            regex_shape(e.regex).unwrap_or_else(|m| panic!("{}: {m}", e.name));
            assert!(e.true_examples.len() >= 2, "{}", e.name);
            assert!(e.false_examples.len() >= 2, "{}", e.name);
        }
    }

    #[test]
    fn true_examples_block_whatever_the_reads_and_never_leave() {
        for e in CATALOGUE {
            let d = compile(e, DetectorAction::Block);
            let starts = regex_shape(e.regex).unwrap().starts;
            for example in e.true_examples {
                // A match starts at an anchor: the first in the example.
                let lead = starts
                    .iter()
                    .filter_map(|s| example.as_bytes().windows(s.len()).position(|w| w == s))
                    .min()
                    .expect("a true example holds an anchor");
                for (before, after) in [("", ""), (BEFORE, AFTER)] {
                    let text = format!("{before}{example}{after}");
                    for chunks in cuts(text.as_bytes()) {
                        let (out, _, block) = run(&d, &chunks);
                        assert_eq!(block, Some(0), "{}: {text:?} in {}", e.name, chunks.len());
                        // Nothing from the secret's first byte on was forwarded.
                        assert!(
                            out.len() <= before.len() + lead,
                            "{}: forwarded {:?}",
                            e.name,
                            String::from_utf8_lossy(&out)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn true_examples_flag_once_and_pass_unchanged() {
        for e in CATALOGUE {
            let d = compile(e, DetectorAction::Flag);
            for example in e.true_examples {
                let text = format!("{BEFORE}{example}{AFTER}");
                for chunks in cuts(text.as_bytes()) {
                    let (out, flags, block) = run(&d, &chunks);
                    assert_eq!((flags, block), (1, None), "{}: {text:?}", e.name);
                    assert_eq!(out, text.as_bytes());
                }
            }
        }
    }

    #[test]
    fn false_examples_do_not_match() {
        for e in CATALOGUE {
            let d = compile(e, DetectorAction::Block);
            for example in e.false_examples {
                for (before, after) in [("", ""), (BEFORE, AFTER)] {
                    let text = format!("{before}{example}{after}");
                    for chunks in cuts(text.as_bytes()) {
                        let (out, _, block) = run(&d, &chunks);
                        assert_eq!(block, None, "{}: {text:?}", e.name);
                        assert_eq!(out, text.as_bytes(), "{}", e.name);
                    }
                }
            }
        }
    }
}
