//! The one-shot commands: webhook-url, verify, twilio-sim. They return `Ok(false)` for "ran, but
//! the answer is no" (a problem found), so the binary can exit non-zero.

use crate::config::{Secret, Settings};
use crate::store::{SqliteStore, Store};
use crate::twilio::TwilioClient;
use anyhow::Context as _;
use std::net::SocketAddr;
use std::time::Duration;

pub async fn webhook_url(
    settings: Settings,
    name: Option<String>,
    rotate: bool,
) -> anyhow::Result<bool> {
    let store = SqliteStore::open(&settings.gateway.data_dir).await?;
    let mut found = false;
    for sms in &settings.sms {
        if name.as_ref().is_some_and(|n| *n != sms.name) {
            continue;
        }
        found = true;
        let token = store
            .webhook_token(sms.name.clone(), rotate, crate::messaging::now_ms())
            .await?;
        println!(
            "{}\t{}/twilio/sms/{token}",
            sms.name, settings.gateway.public_url
        );
    }
    if !found {
        eprintln!(
            "no [[sms]] configuration named {:?}",
            name.unwrap_or_default()
        );
    }
    Ok(found)
}

pub async fn verify(settings: Settings, name: String, apply: bool) -> anyhow::Result<bool> {
    let index = settings
        .sms
        .iter()
        .position(|s| s.name == name)
        .with_context(|| format!("no [[sms]] configuration named {name:?}"))?;
    let sms = &settings.sms[index];
    let store = SqliteStore::open(&settings.gateway.data_dir).await?;
    let token = store
        .webhook_token(sms.name.clone(), false, crate::messaging::now_ms())
        .await?;
    let webhook = format!("{}/twilio/sms/{token}", settings.gateway.public_url);
    let account = crate::twilio::Account::for_config(sms);
    let client = TwilioClient::new(Duration::from_secs(15));
    let numbers = client
        .incoming_numbers(&account)
        .await
        .context("listing the account's numbers (IncomingPhoneNumbers.json)")?;
    println!(
        "credentials OK: {} numbers on account {}",
        numbers.len(),
        sms.account_sid
    );
    println!(
        "{:<16} {:<4} {:<4} messaging webhook",
        "number", "sms", "mms"
    );
    for n in &numbers {
        let caps = n.capabilities.clone().unwrap_or_default();
        let yes = |b: Option<bool>| if b == Some(true) { "yes" } else { "no" };
        println!(
            "{:<16} {:<4} {:<4} {}",
            n.phone_number,
            yes(caps.sms),
            yes(caps.mms),
            n.sms_url
                .as_deref()
                .filter(|u| !u.is_empty())
                .unwrap_or("(none)")
        );
    }
    let mut ok = true;
    for did in &sms.dids {
        let Some(n) = numbers.iter().find(|n| n.phone_number == did.as_str()) else {
            println!("PROBLEM {did}: not a number of this account");
            ok = false;
            continue;
        };
        if n.capabilities.as_ref().and_then(|c| c.sms) != Some(true) {
            println!("PROBLEM {did}: not SMS-capable");
            ok = false;
        }
        if n.sms_url.as_deref() != Some(webhook.as_str()) {
            if apply {
                client.set_sms_url(&account, &n.sid, &webhook).await?;
                println!("SET     {did}: messaging webhook is now {webhook}");
            } else {
                println!("PROBLEM {did}: messaging webhook is not smsgw's ({webhook}); run with --apply to set it");
                ok = false;
            }
        }
    }
    Ok(ok)
}

#[derive(clap::Args, Debug)]
pub struct SimArgs {
    #[command(subcommand)]
    pub inbound: Option<SimCommand>,
    /// Where the stand-in listens.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "AC00000000000000000000000000000000")]
    pub account_sid: String,
    #[arg(long, default_value = "demo-auth-token")]
    pub auth_token: String,
    /// API keys accepted besides the account's own credentials: SK…:secret.
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// The account's SMS-capable numbers (repeat).
    #[arg(long = "number")]
    pub numbers: Vec<String>,
    /// Twilio's OpenAPI description (twilio_api_v2010.json): every request is checked against it.
    #[arg(long)]
    pub spec: Option<std::path::PathBuf>,
    /// Delay before each status callback, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub callback_delay_ms: u64,
    /// Where inbound SMS go when `/_sim/inbound` names no URL (smsgw's webhook URL).
    #[arg(long)]
    pub webhook_url: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum SimCommand {
    /// Sign and post one inbound SMS to a webhook URL, exactly as Twilio does.
    Inbound {
        #[arg(long)]
        url: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "")]
        body: String,
        #[arg(long, default_value_t = 0)]
        media: u32,
    },
}

pub async fn twilio_sim(args: SimArgs) -> anyhow::Result<bool> {
    if let Some(SimCommand::Inbound {
        url,
        from,
        to,
        body,
        media,
    }) = &args.inbound
    {
        let inbound = crate::twilio::sim::Inbound {
            url: Some(url.clone()),
            from: from.clone(),
            to: to.clone(),
            body: body.clone(),
            media: *media,
            message_sid: None,
            extra: vec![],
            sign_with: None,
        };
        let params = crate::twilio::sim::inbound_params(
            &args.account_sid,
            &format!("http://{}", args.listen),
            &inbound,
        );
        let sig = crate::twilio::signature::compute(&args.auth_token, url, &params);
        let resp = reqwest::Client::new()
            .post(url)
            .header("X-Twilio-Signature", sig)
            .form(&params)
            .send()
            .await
            .with_context(|| format!("posting to {url}"))?;
        let status = resp.status();
        println!(
            "{} {}",
            status.as_u16(),
            resp.text().await.unwrap_or_default()
        );
        return Ok(status.is_success());
    }
    let spec = match &args.spec {
        Some(p) => Some(serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    let api_keys = args
        .api_keys
        .iter()
        .map(|k| {
            k.split_once(':')
                .map(|(s, p)| (s.to_string(), Secret::new(p)))
                .context("--api-key takes SK…:secret")
        })
        .collect::<anyhow::Result<_>>()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    let config = crate::twilio::sim::SimConfig {
        account_sid: args.account_sid,
        auth_token: Secret::new(args.auth_token),
        api_keys,
        numbers: args.numbers,
        spec,
        callback_delay: Duration::from_millis(args.callback_delay_ms),
        default_webhook: args.webhook_url,
        public_base: format!("http://{local}"),
    };
    tracing::info!(listen = %local, "Twilio stand-in ready");
    axum::serve(listener, crate::twilio::sim::router(config))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(true)
}
